"""The baselines of ``meta-evaluate`` through the meta-learning protocol on the tiny model:
BLoB fitted on each support set, multi-task LoRA then fine-tuning (and the ones before them),
their determinism and reset between tasks, what each fits, a bad name, and cloze scoring
through the protocol."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from blob_lora.cli.main import main
from blob_lora.models.loading import load_model_and_tokenizer
from blob_lora.pipeline import meta_evaluate as meta_evaluate_module
from blob_lora.pipeline import meta_multitask
from blob_lora.pipeline.meta_baselines import baseline_contender
from blob_lora.pipeline.meta_evaluate import evaluate_task, meta_evaluate, open_run
from blob_lora.tuners.abmll.meta import expected_nll
from blob_lora.tuners.blob import blob_layers, kl_divergence, std_parameters
from blob_lora.tuners.peft_adapter import read_adapter_weights
from blob_lora.utils.errors import ConfigError
from tests.factories import tiny_model_folder, tiny_task_collection
from tests.pipeline.test_meta import timeless, train_args

torch.set_num_threads(1)

FITTED = ("lora-support", "blob-support", "multitask-lora")


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    """A 3-step ABMLL run on 4 tiny tasks, 2 held out (k = 3, 7 questions scored each), whose
    adaptation budget is 2 steps at ABMLL's inner rate 1e-2."""
    root = tmp_path_factory.mktemp("meta-baselines")
    model = tiny_model_folder(root / "model")
    tasks = tiny_task_collection(root / "tasks", n_tasks=4, n_questions=10)
    out = root / "run"
    assert main(train_args(tasks, model, out)) == 0
    return root, model, tasks, out


@pytest.fixture
def run_copy(meta_run, tmp_path):
    """The run folder copied, so the multi-task weights one test keeps are not another's."""
    _, model, _, out = meta_run
    return shutil.copytree(out, tmp_path / "run"), model


def evaluate_cli(run, out, *extra: str) -> dict:
    assert main(["meta-evaluate", "--run", str(run), "--out", str(out), "--no-progress",
                 *extra]) == 0  # fmt: skip
    name = f"meta_eval_{extra[extra.index('--baseline') + 1]}.json" if extra else "meta_eval.json"
    return json.loads((out / name).read_text())


def contender_of(name: str, run, model_dir, **kwargs):
    """``name``'s contender on a freshly loaded base model, and the opened run."""
    base, tokenizer = load_model_and_tokenizer(str(model_dir))
    meta_run, base = open_run(run, base, tokenizer)
    return baseline_contender(name, base, meta_run, **kwargs), meta_run


def adapter_state(model) -> dict[str, torch.Tensor]:
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.parametrize(("name", "n_samples"), [("blob-support", 10), ("multitask-lora", 0)])
def test_a_baseline_scores_every_held_out_task_deterministically(run_copy, tmp_path, name,
                                                                 n_samples):  # fmt: skip
    run, _ = run_copy
    first = evaluate_cli(run, tmp_path / "e1", "--baseline", name)
    held_out = json.loads((run / "tasks.json").read_text())["meta_test"]
    assert first["method"] == name and list(first["tasks"]) == held_out
    assert first["eval_samples"] == n_samples and first["k_shot"] == 3 and first["seed"] == 1
    # the run's saved budget (--abmll-inner-steps 2, inner_lr's 1e-2), not a default of ours
    assert first["adaptation"] == {"steps": 2, "lr": 1e-2}
    for m in first["tasks"].values():
        assert m["n_examples"] == 7 and 0 <= m["accuracy"] <= 1 and m["nll"] > 0
    for key in ("accuracy", "ece", "nll", "brier"):
        per_task = [m[key] for m in first["tasks"].values()]
        assert first["mean"][key] == pytest.approx(sum(per_task) / len(per_task))
    # again: the same fit, the same weight samples (multitask-lora: from its kept weights)
    assert timeless(evaluate_cli(run, tmp_path / "e2", "--baseline", name)) == timeless(first)
    # and not the pretrained model's predictive: the fit did something
    zero = evaluate_cli(run, tmp_path / "e0", "--baseline", "zero-shot")
    assert zero["mean"]["nll"] != first["mean"]["nll"]


@pytest.mark.parametrize("name", FITTED)
def test_a_fitted_baseline_is_reset_before_each_task(run_copy, name):
    run, model_dir = run_copy
    contender, meta_run = contender_of(name, run, model_dir)
    task_a, task_b = meta_run.split.test
    evaluate_task(contender, task_a, meta_run)
    b_after_a = evaluate_task(contender, task_b, meta_run)
    alone, meta_run = contender_of(name, run, model_dir)
    assert evaluate_task(alone, task_b, meta_run) == b_after_a


def test_blob_support_is_plain_sgd_on_the_per_example_elbo(meta_run):
    """The fit equals the run's budget of SGD steps on ``NLL + KL / n`` taken by hand (the
    optimiser of every adaptation in the comparison), mean, ``B`` and std alike."""
    _, model_dir, _, run = meta_run
    contender, meta_run = contender_of("blob-support", run, model_dir)
    model = contender.adaptation.__self__.model
    assert contender.method.name == "blob" and contender.n_samples == 10
    assert len(list(blob_layers(model))) > 0
    initial = adapter_state(model)
    kl_before = float(kl_divergence(model))
    pool = meta_run.split.test[0]
    support, _ = pool.draw(3, None, 0)
    inputs = meta_run.inputs
    batches, nll = inputs.batches(pool, support), inputs.nll(pool)
    with contender.adaptation(batches, nll, 0) as fitted:
        moved = adapter_state(fitted)
        stds_after = [p.detach().clone() for p in std_parameters(fitted)]
        assert float(kl_divergence(fitted)) < kl_before
    # by hand: from the initial adapter, the same weight samples, 2 steps at lr 1e-2
    set_peft_model_state_dict(model, initial)
    params = [p for p in model.parameters() if p.requires_grad]
    stds_before = [p.detach().clone() for p in std_parameters(model)]
    torch.manual_seed(0)
    model.train()
    for _ in range(meta_run.budget.inner_steps):
        elbo = expected_nll(model, batches, nll, 1) + kl_divergence(model) / 3
        grads = torch.autograd.grad(elbo, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= meta_run.budget.inner_lr * g
    by_hand = adapter_state(model)
    assert by_hand.keys() == moved.keys()
    for k in moved:
        torch.testing.assert_close(moved[k], by_hand[k], rtol=1e-5, atol=1e-7)
    # every std parameter and the mean path moved
    assert all(not torch.equal(b, a) for b, a in zip(stds_before, stds_after, strict=True))
    assert any(not torch.equal(moved[k], initial[k]) for k in initial if "lora_B" in k)
    # fitted again: from the initial adapter, not on from the fitted one (and seeded alike)
    with contender.adaptation(batches, nll, 0) as refitted:
        again = adapter_state(refitted)
    assert all(torch.equal(again[k], moved[k]) for k in moved)


def test_blob_support_predicts_by_weight_samples(run_copy, tmp_path):
    run, _ = run_copy
    sampled = evaluate_cli(run, tmp_path / "n10", "--baseline", "blob-support")
    means = evaluate_cli(run, tmp_path / "n0", "--baseline", "blob-support", "--eval-samples", "0")
    few = evaluate_cli(run, tmp_path / "n3", "--baseline", "blob-support", "--eval-samples", "3")
    assert (sampled["eval_samples"], means["eval_samples"], few["eval_samples"]) == (10, 0, 3)
    nlls = {r["mean"]["nll"] for r in (sampled, means, few)}
    assert len(nlls) == 3  # N = 0 is the mean weights, N = 3 and N = 10 other averages


def test_multitask_lora_trains_on_the_meta_train_tasks_and_fine_tunes_from_them(run_copy,
                                                                                monkeypatch):  # fmt: skip
    run, model_dir = run_copy
    steps: list[int] = []
    draw = meta_multitask.draw_tasks

    def spy(split, cfg, step, inputs):
        steps.append(step)
        assert [p.name for p in split.train] == held_in
        tasks = draw(split, cfg, step, inputs)
        assert len(tasks) == cfg.meta_batch_tasks
        return tasks

    held_in = json.loads((run / "tasks.json").read_text())["meta_train"]
    monkeypatch.setattr(meta_multitask, "draw_tasks", spy)
    contender, meta_run = contender_of("multitask-lora", run, model_dir)
    assert steps == [0, 1, 2]  # ABMLL's meta-steps, drawn the same way
    kept = run / meta_multitask.MULTITASK_DIR
    log = [json.loads(line) for line in (kept / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3] and all(row["loss"] > 0 for row in log)
    assert json.loads((kept / "trained_under.json").read_text()) == meta_run.cfg.to_dict()
    multitask = read_adapter_weights(kept / "adapter")
    lora = contender.adaptation.__self__
    assert lora.initial.keys() == multitask.keys()
    assert all(torch.equal(lora.initial[k], multitask[k]) for k in multitask)
    # not a fresh adapter: B left 0 and A its seeded start
    base, _ = load_model_and_tokenizer(str(model_dir))
    torch.manual_seed(meta_run.cfg.seed)
    fresh = adapter_state(get_peft_model(base, meta_run.cfg.peft_config()))
    assert all(torch.count_nonzero(fresh[k]) == 0 for k in fresh if "lora_B" in k)
    assert all(torch.count_nonzero(multitask[k]) > 0 for k in multitask if "lora_B" in k)
    assert all(not torch.equal(fresh[k], multitask[k]) for k in fresh)
    # the fine-tuning starts at those weights: with no step it scores them as they are, with
    # the run's budget it moves from them, and less far than they are from a fresh adapter
    pool = meta_run.split.test[0]
    support, _ = pool.draw(3, None, 0)
    args = (meta_run.inputs.batches(pool, support), meta_run.inputs.nll(pool), 0)
    with contender.adaptation(*args) as tuned:
        after = adapter_state(tuned)
    assert any(not torch.equal(after[k], multitask[k]) for k in multitask)
    for k in multitask:
        assert (after[k] - multitask[k]).norm() < (after[k] - fresh[k]).norm()
    lora.steps = 0
    with contender.adaptation(*args) as untouched:
        assert all(torch.equal(adapter_state(untouched)[k], multitask[k]) for k in multitask)
    # a second evaluation reuses the kept weights: no training
    steps.clear()
    again, _ = contender_of("multitask-lora", run, model_dir)
    assert steps == [] and all(
        torch.equal(again.adaptation.__self__.initial[k], multitask[k]) for k in multitask
    )
    # weights kept under other settings are trained again, under the run's
    (kept / "trained_under.json").write_text(json.dumps({**meta_run.cfg.to_dict(), "lr": 1.0}))
    contender_of("multitask-lora", run, model_dir)
    assert steps == [0, 1, 2]
    assert json.loads((kept / "trained_under.json").read_text()) == meta_run.cfg.to_dict()


def test_every_fit_takes_the_runs_budget(run_copy):
    run, model_dir = run_copy
    budget = json.loads((run / "adapter" / "abmll_config.json").read_text())
    for name in FITTED:
        contender, meta_run = contender_of(name, run, model_dir)
        fit = contender.adaptation.__self__
        assert (fit.steps, fit.lr) == (budget["inner_steps"], budget["inner_lr"]) == (2, 1e-2)
        assert meta_run.budget.inner_steps == 2


def test_a_bad_baseline_name_is_refused_listing_the_baselines(meta_run, tmp_path, capsys):
    _, _, _, run = meta_run
    listed = "zero-shot, lora-support, blob-support, multitask-lora"
    with pytest.raises(ConfigError, match=f"--baseline must be one of {listed}, got 'blob'"):
        meta_evaluate(run, tmp_path, baseline="blob")
    with pytest.raises(SystemExit) as exited:  # argparse refuses it, listing the choices
        main(["meta-evaluate", "--run", str(run), "--baseline", "blob"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'blob'" in err and "'blob-support', 'multitask-lora'" in err
    assert not list(tmp_path.glob("meta_eval*.json"))


def test_cloze_scoring_runs_through_the_protocol(meta_run, tmp_path, monkeypatch):
    root, model_dir, tasks, letter_run = meta_run
    run = tmp_path / "cloze"
    assert main(train_args(tasks, model_dir, run, "--scoring", "cloze")) == 0
    assert json.loads((run / "meta_config.json").read_text())["scoring"] == "cloze"
    seen: dict[str, list] = {"support": [], "probs": [], "items": []}
    adapt, predict = meta_evaluate_module.adapt, meta_evaluate_module.predict_dataset

    def adapt_spy(model, support, nll, **kwargs):
        seen["support"].extend(support)
        return adapt(model, support, nll, **kwargs)

    def predict_spy(model, method, dataset, *args, **kwargs):
        seen["items"].append(dataset[0])
        pred = predict(model, method, dataset, *args, **kwargs)
        seen["probs"].append(pred.probs)
        return pred

    monkeypatch.setattr(meta_evaluate_module, "adapt", adapt_spy)
    monkeypatch.setattr(meta_evaluate_module, "predict_dataset", predict_spy)
    cloze = evaluate_cli(run, tmp_path / "e")
    # the support sets ABMLL adapts on and the questions it scores are cloze-encoded: one
    # packed sequence per question with its options' branches and target tokens
    assert len(seen["support"]) == 2
    for batch in seen["support"]:
        assert {"branch", "target_option", "prev_offset", "divisor"} <= batch.keys()
        assert int(batch["branch"].max()) == 3  # 0 the question, 1..3 its three options
    assert all({"branch", "target_option"} <= item.keys() for item in seen["items"])
    for probs in seen["probs"]:
        assert probs.shape == (7, 3)
        assert torch.allclose(probs.sum(-1), torch.ones(7, dtype=probs.dtype), atol=1e-5)
    assert all(m["n_examples"] == 7 for m in cloze["tasks"].values())
    # the same split, seed and model scored by letters reads other logits
    letter = evaluate_cli(letter_run, tmp_path / "l")
    assert cloze["mean"]["nll"] != pytest.approx(letter["mean"]["nll"], rel=1e-3)
    zero_cloze = evaluate_cli(run, tmp_path / "zc", "--baseline", "zero-shot")
    zero_letter = evaluate_cli(letter_run, tmp_path / "zl", "--baseline", "zero-shot")
    assert list(zero_cloze["tasks"]) == list(zero_letter["tasks"])
    assert zero_cloze["mean"]["nll"] != pytest.approx(zero_letter["mean"]["nll"], rel=1e-3)


def test_eval_samples_on_a_point_estimate_baseline_is_said_to_be_ignored(
    run_copy, tmp_path, caplog
):
    """``--eval-samples 10`` cannot change a point estimate's predictive: the file records
    N = 0 and the user is told, rather than left to think ten samples were averaged."""
    run, _ = run_copy
    with caplog.at_level("WARNING", logger="blob_lora.pipeline.meta_evaluate"):
        result = evaluate_cli(
            run, tmp_path / "e", "--baseline", "zero-shot", "--eval-samples", "10"
        )
    assert result["eval_samples"] == 0
    assert "--eval-samples 10 ignored: zero-shot predicts at its point estimate" in caplog.text
