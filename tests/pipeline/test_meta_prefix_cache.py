"""The frozen-prefix reuse of ``meta-train`` and ``meta-evaluate`` on the tiny model: with the
adapters on the top block, block 0 runs once per support / query batch of an adaptation and
once per scored question, and every result (the meta-train log and adapter, each contender's
adapted parameters, the per-task metrics) is the one of the full forward; without a frozen
prefix (an adapter in block 0, base-model dropout while training) everything runs whole and
still works; a resumed run stays the uninterrupted one, bit for bit; ``--prefix-cache false``
switches it off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blob_lora.cli.main import main
from blob_lora.models.loading import load_model_and_tokenizer
from blob_lora.pipeline import meta_evaluate as meta_evaluate_module
from blob_lora.pipeline import meta_train as meta_train_module
from blob_lora.pipeline.meta_baselines import baseline_contender
from blob_lora.pipeline.meta_config import MetaConfig
from blob_lora.pipeline.meta_evaluate import meta_evaluate, open_run
from blob_lora.pipeline.meta_train import meta_train
from blob_lora.tasks.collection import task_seed
from blob_lora.tuners.abmll import AbmllConfig, abmll_layers, adapt, load_abmll_model, meta_loss
from blob_lora.tuners.abmll.meta import Task
from tests.factories import tiny_model_folder, tiny_task_collection
from tests.pipeline.test_meta_baselines import adapter_state
from tests.pipeline.test_meta_resume import args as resume_args
from tests.pipeline.test_meta_resume import assert_same_run, killed_run

torch.set_num_threads(1)

#: ABMLL (and every baseline's adapter) on block 1 of the tiny model's 2: block 0 is frozen
TOP = r".*\.layers\.1\.self_attn\.(q_proj|v_proj)"
STEPS, INNER, TASKS_PER_STEP = 2, 3, 2
CONTENDERS = (None, "zero-shot", "lora-support", "blob-support", "multitask-lora")


def protocol(tasks: Path, model: Path, **changes) -> MetaConfig:
    """2 meta-steps over 2 of 4 tiny tasks (2 held out; k = 3, 4 query and 7 scored questions:
    one batch each), LoRA dropout on: its draws must line up with and without the cache."""
    settings = {
        "tasks": str(tasks),
        "model": str(model),
        "meta_test_tasks": 2,
        "k_shot": 3,
        "query_size": 4,
        "max_length": 96,
        "lora_r": 2,
        "lora_dropout": 0.1,
        "meta_steps": STEPS,
        "seed": 1,
        "target_modules": [TOP],
        **changes,
    }
    return MetaConfig(**settings)


def counted_base(model_dir: Path, **config):
    """The tiny base model and tokenizer, ``config`` set on its config, and a counter of the
    forwards of its block 0 (PEFT wraps the model in place: the count sees every forward)."""
    base, tokenizer = load_model_and_tokenizer(str(model_dir))
    for key, value in config.items():
        setattr(base.config, key, value)
    calls = [0]
    base.model.layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return base, tokenizer, calls


def trained(cfg: MetaConfig, out: Path, prefix_cache: bool, **config) -> tuple[dict, int]:
    """``meta_train`` into ``out``: its log, adapter and the forwards of block 0."""
    base, tokenizer, calls = counted_base(Path(cfg.model), **config)
    meta_train(
        cfg,
        out,
        AbmllConfig(inner_steps=INNER),
        model=base,
        tokenizer=tokenizer,
        progress=False,
        checkpoint_every=0,
        prefix_cache=prefix_cache,
    )
    log = [json.loads(x) for x in (out / "meta_train_log.jsonl").read_text().splitlines()]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    return {"log": log, "adapter": adapter}, calls[0]


def assert_same_training(got: dict, want: dict) -> None:
    assert [r["step"] for r in got["log"]] == [r["step"] for r in want["log"]]
    for row, ref in zip(got["log"], want["log"], strict=True):
        assert row.keys() == ref.keys()
        for key in ("loss", "query_nll", "task_kl", "hyper_nll"):
            assert row[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    assert got["adapter"].keys() == want["adapter"].keys()
    for name, value in want["adapter"].items():
        torch.testing.assert_close(got["adapter"][name], value, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta-prefix")
    model = tiny_model_folder(root / "model")
    tasks = tiny_task_collection(root / "tasks", n_tasks=4, n_questions=10)
    return root, model, tasks


@pytest.fixture(scope="module")
def runs(setup):
    """A cached letter run and a cached cloze run (the cache is on by default)."""
    root, model, tasks = setup
    out = {}
    for scoring in ("letter", "cloze"):
        out[scoring] = root / f"run-{scoring}"
        trained(protocol(tasks, model, scoring=scoring), out[scoring], prefix_cache=True)
    return out


@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_meta_train_logs_the_same_losses_running_the_frozen_block_once_per_batch(
    setup, tmp_path, scoring
):
    _, model, tasks = setup
    cfg = protocol(tasks, model, scoring=scoring)
    full, full_calls = trained(cfg, tmp_path / "full", prefix_cache=False)
    cached, cached_calls = trained(cfg, tmp_path / "cached", prefix_cache=True)
    assert_same_training(cached, full)
    # per step and task: one support and one query batch; full: INNER support passes + query
    assert full_calls == STEPS * TASKS_PER_STEP * (INNER + 1)
    assert cached_calls == STEPS * TASKS_PER_STEP * 2
    # the steps learned something: the comparison is not of two untouched adapters
    assert any(v.abs().max() > 0 for k, v in cached["adapter"].items() if "lora_B" in k)


def test_second_order_meta_gradients_are_the_same_through_the_cache(setup, runs):
    """``first_order=False`` differentiates through every inner step: the cached prefix must
    give the same meta-loss and gradients of ``theta`` (eager attention: CPU's fused attention
    has no second derivatives)."""
    _, model_dir, _ = setup
    run = runs["letter"]

    def loss_and_grads(prefix_cache: bool):
        base, tokenizer, calls = counted_base(model_dir, _attn_implementation="eager")
        meta_run, base = open_run(run, base, tokenizer, prefix_cache)
        model = load_abmll_model(base, run / "adapter", is_trainable=True)
        for _, layer in abmll_layers(model):
            layer.abmll_config.first_order = False
        inputs = meta_run.inputs
        tasks = []
        for pool in meta_run.split.train:
            support, query = pool.draw(3, 4, task_seed(7, pool.name))
            batches = inputs.batches(pool, support), inputs.batches(pool, query)
            tasks.append(Task(*batches, inputs.nll(pool)))
        torch.manual_seed(0)  # LoRA dropout: a trainable model is in training mode
        loss, parts = meta_loss(model, tasks, seed=3)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), parts, grads, calls[0]

    full_loss, full_parts, full_grads, full_calls = loss_and_grads(False)
    loss, parts, grads, calls = loss_and_grads(True)
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-7)
    assert parts == pytest.approx(full_parts, rel=1e-6)
    assert grads.keys() == full_grads.keys() and len(grads) > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-8)
    # per meta-train task: the run's INNER inner steps on one support batch, one query batch
    n_tasks = 2
    assert (full_calls, calls) == (n_tasks * (INNER + 1), n_tasks * 2)


@pytest.mark.parametrize("name", ["abmll", "lora-support", "blob-support", "multitask-lora"])
def test_an_adaptation_through_the_cache_lands_on_the_same_parameters(runs, setup, tmp_path, name):
    _, model_dir, _ = setup
    run = shutil.copytree(runs["cloze"], tmp_path / "run")

    def fitted(prefix_cache: bool) -> tuple[dict[str, torch.Tensor], int]:
        base, tokenizer, calls = counted_base(model_dir)
        meta_run, base = open_run(run, base, tokenizer, prefix_cache)
        pool = meta_run.split.test[0]
        seed = task_seed(meta_run.cfg.seed, pool.name)
        support, _ = pool.draw(meta_run.cfg.k_shot, None, seed)
        batches, nll = meta_run.inputs.batches(pool, support), meta_run.inputs.nll(pool)
        if name == "abmll":
            model = load_abmll_model(base, run / "adapter")
            before = calls[0]
            posterior = adapt(model, batches, nll, seed=seed)
            return {"/".join(k): v for k, v in posterior.items()}, calls[0] - before
        contender = baseline_contender(name, base, meta_run)  # multitask-lora: trains first
        before = calls[0]
        with contender.adaptation(batches, nll, seed) as model:
            return adapter_state(model), calls[0] - before

    full, full_calls = fitted(False)
    cached, cached_calls = fitted(True)
    assert cached.keys() == full.keys() and len(full) > 0
    for key, value in full.items():
        torch.testing.assert_close(cached[key], value, rtol=1e-6, atol=1e-7)
    # the run's budget: INNER inner steps on the one support batch
    assert (full_calls, cached_calls) == (INNER, 1)


@pytest.mark.parametrize("baseline", CONTENDERS)
def test_meta_evaluate_scores_the_same_metrics_with_and_without_the_cache(
    runs, setup, tmp_path, baseline
):
    _, model_dir, _ = setup
    results, calls = {}, {}
    for prefix_cache in (False, True):
        run = shutil.copytree(runs["letter"], tmp_path / f"run-{prefix_cache}")
        base, tokenizer, counter = counted_base(model_dir)
        results[prefix_cache] = meta_evaluate(
            run,
            baseline=baseline,
            model=base,
            tokenizer=tokenizer,
            progress=False,
            prefix_cache=prefix_cache,
        )
        calls[prefix_cache] = counter[0]
    full, cached = results[False], results[True]
    assert list(cached["tasks"]) == list(full["tasks"]) and len(full["tasks"]) == 2
    for task, metrics in full["tasks"].items():
        assert cached["tasks"][task] == pytest.approx(metrics, rel=1e-5, abs=1e-7), task
    measured = ("tasks", "mean", "task_seconds")
    assert {k: v for k, v in cached.items() if k not in measured} == {
        k: v for k, v in full.items() if k not in measured
    }
    n_tasks = len(full["tasks"])
    if baseline == "zero-shot":  # the pretrained model has no adapter: nothing is frozen
        assert calls[True] == calls[False]
    elif baseline == "multitask-lora":  # its training (one pass per batch) is counted too
        assert calls[True] < calls[False]
    else:  # per task: INNER support passes + one scoring pass, or one of each
        assert calls[False] == n_tasks * (INNER + 1)
        assert calls[True] == n_tasks * 2


@pytest.mark.parametrize(
    ("case", "changes", "config"),
    [
        ("adapter in block 0", {"target_modules": ["q_proj", "v_proj"]}, {}),
        ("base dropout", {}, {"attention_dropout": 0.1}),
    ],
)
def test_without_a_frozen_prefix_everything_runs_whole_and_still_works(
    setup, tmp_path, case, changes, config
):
    """The cache is on but cannot apply (``frozen_prefix_length`` is 0 while training):
    every forward runs block 0, and the run is the one without the cache."""
    _, model, tasks = setup
    cfg = protocol(tasks, model, **changes)
    full, full_calls = trained(cfg, tmp_path / "full", False, **config)
    cached, cached_calls = trained(cfg, tmp_path / "cached", True, **config)
    assert cached_calls == full_calls == STEPS * TASKS_PER_STEP * (INNER + 1)
    assert cached["log"] == full["log"]
    assert all(torch.equal(cached["adapter"][k], v) for k, v in full["adapter"].items())
    # and meta-evaluate of such a run works with the cache on (adapters in block 0: no prefix)
    if case == "adapter in block 0":
        base, tokenizer, calls = counted_base(model)
        result = meta_evaluate(tmp_path / "cached", model=base, tokenizer=tokenizer, progress=False)
        assert all(m["n_examples"] == 7 for m in result["tasks"].values())
        assert calls[0] == 2 * (INNER + 1)


def test_a_killed_cached_run_resumes_bit_for_bit_and_may_switch_the_cache(
    setup, tmp_path, monkeypatch
):
    """Nothing of the cache outlives a step, so a resumed run is the uninterrupted one, bit
    for bit; ``--prefix-cache`` is no setting of the run: a resume may switch it."""
    _, model, tasks = setup
    top = ("--target-modules", TOP)
    reference = tmp_path / "reference"
    assert main(resume_args(tasks, model, reference, *top)) == 0
    for name, extra in (("same", ()), ("switched", ("--prefix-cache", "false"))):
        run = tmp_path / name
        killed_run(monkeypatch, tasks, model, run, 2, *top)
        assert main(resume_args(tasks, model, run, *top, "--resume", *extra)) == 0
        assert_same_run(run, reference)


def test_prefix_cache_option_reaches_both_commands(setup, tmp_path, monkeypatch, capsys):
    seen: list[tuple[str, object]] = []

    def fake_train(*args, **kwargs):
        seen.append(("train", kwargs["prefix_cache"]))
        return {"meta_train": [], "meta_test": []}

    def fake_evaluate(*args, **kwargs):
        seen.append(("evaluate", kwargs["prefix_cache"]))
        return {"method": "abmll", "eval_samples": 0, "k_shot": 1, "tasks": {}, "mean": {
            "accuracy": 0.0, "ece": 0.0, "nll": 0.0, "brier": 0.0}}  # fmt: skip

    monkeypatch.setattr(meta_train_module, "meta_train", fake_train)
    monkeypatch.setattr(meta_evaluate_module, "meta_evaluate", fake_evaluate)
    _, model, tasks = setup
    base = ["meta-train", "--tasks", str(tasks), "--model", str(model), "--out", str(tmp_path)]
    assert main(base) == 0
    assert main([*base, "--prefix-cache", "false"]) == 0
    config = tmp_path / "meta.yaml"
    config.write_text("prefix_cache: false\n")
    assert main([*base, "--config", str(config)]) == 0
    assert main(["meta-evaluate", "--run", str(tmp_path)]) == 0
    assert main(["meta-evaluate", "--run", str(tmp_path), "--prefix-cache", "no"]) == 0
    assert seen == [
        ("train", True), ("train", False), ("train", False), ("evaluate", True),
        ("evaluate", False),
    ]  # fmt: skip
    config.write_text("prefix_cache: maybe\n")
    assert main([*base, "--config", str(config)]) == 2
    assert "--prefix-cache must be true or false, got 'maybe'" in capsys.readouterr().err
