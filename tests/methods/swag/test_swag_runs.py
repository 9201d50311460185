"""SWAG-LoRA and MultiSWAG through the harness on a tiny random Llama and real data slices:
what the loop collects, the learning rate while it collects, the saved SWA adapter and its
posterior, bit-exact reloads, one weight draw per forward, resume after a kill, the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blob_lora.methods.base import RunSettings, StepSchedule
from blob_lora.methods.io import load_plain_adapter
from blob_lora.methods.swag.binding import Binding
from blob_lora.methods.swag.method import SwagMethod, posteriors
from blob_lora.methods.swag.posterior import POSTERIOR_FILE, SwagPosterior
from blob_lora.models.forward import answer_logits
from blob_lora.tasks import MCCollator, MCDataset, get_task, option_token_ids
from blob_lora.training import checkpoint as ckpt
from blob_lora.training.saved_run import load_run
from blob_lora.training.trainer import RunStart, run_training
from blob_lora.utils.errors import ConfigError
from tests.factories import (
    TINY_EVAL_SPLIT,
    TINY_TASK,
    TINY_TRAIN_SPLIT,
    tiny_model_folder,
    tiny_run_config,
    train_tiny,
)

torch.set_num_threads(1)


def eval_batch(char_tok, data_root: Path, scoring=None, max_length: int = 256):
    task = get_task(TINY_TASK, data_root=str(data_root))
    kw = {} if scoring is None else {"scoring": scoring}
    ds = MCDataset(task, TINY_EVAL_SPLIT, char_tok, max_length, **kw)
    batch = MCCollator(char_tok.pad_token_id, task.n_options)([ds[i] for i in range(len(ds))])
    return batch, option_token_ids(char_tok, task)


class RecordingSwag(SwagMethod):
    """SWAG that also keeps a copy of every iterate it collects (to check the moments)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []
        self.steps: list[int] = []

    def after_step(
        self, model: torch.nn.Module, cfg: RunSettings, step: int, schedule: StepSchedule
    ) -> None:
        before = posteriors(model)["default"].count
        super().after_step(model, cfg, step, schedule)
        if posteriors(model)["default"].count > before:
            self.seen.append(Binding.trainable(model).flat().clone())
            self.steps.append(step)


def test_the_loop_collects_the_iterates_of_its_schedule(tmp_path, data_root, char_base, char_tok):
    # 6 steps of 2 per epoch; collection after step 3 (--swag-start 0.5), every step
    cfg = tiny_run_config(
        tmp_path / "swag", data_root, "swag", max_steps=6, swag_rank=2, evaluate=False
    )
    method = RecordingSwag()
    start = RunStart(base_model=copy.deepcopy(char_base), tokenizer=char_tok, progress=False)
    trained = run_training(cfg, method, start)
    assert method.steps == [4, 5, 6]
    x = torch.stack(method.seen)
    post = posteriors(trained.model)["default"]
    assert post.count == 3
    torch.testing.assert_close(post.mean, x.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(post.sq_mean, (x * x).mean(0), rtol=0, atol=1e-12)
    assert (x[0] - x[2]).abs().max() > 1e-5  # the iterates really move while collected
    # rank 2: the deviations of steps 5 and 6 from the running means then
    expected = torch.stack([x[1] - x[:2].mean(0), x[2] - x.mean(0)]).float()
    torch.testing.assert_close(post.deviations, expected, rtol=1e-5, atol=1e-7)
    # after training the adapter holds the SWA mean
    torch.testing.assert_close(
        Binding.trainable(trained.model).flat(), post.mean.float().double(), rtol=0, atol=0
    )
    # the learning rate: the run's schedule, then --lr / 10 held while collecting (the log
    # shows the rate the next update uses)
    log = [
        json.loads(line) for line in (Path(cfg.out) / "train_log.jsonl").read_text().splitlines()
    ]
    lrs = [r["lr"] for r in log]
    assert lrs[2:] == [pytest.approx(cfg.loop.lr / 10, rel=1e-12)] * 4
    assert all(lr > 2 * cfg.loop.lr / 10 for lr in lrs[:2])


def test_swag_lr_setting_is_the_rate_while_collecting(tmp_path, data_root, char_base, char_tok):
    cfg = tiny_run_config(
        tmp_path / "swag", data_root, "swag", max_steps=4, swag_lr=3e-3, evaluate=False
    )
    start = RunStart(base_model=copy.deepcopy(char_base), tokenizer=char_tok, progress=False)
    run_training(cfg, SwagMethod(), start)
    log = (Path(cfg.out) / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["lr"] for r in log][2:] == [pytest.approx(3e-3)] * 2


def test_too_few_collections_are_refused_before_training(tmp_path, data_root, char_base, char_tok):
    # once per epoch (2 steps) after step 2 of 4: one iterate only
    cfg = tiny_run_config(tmp_path / "swag", data_root, "swag", max_steps=4, swag_every=0)
    with pytest.raises(ConfigError, match="collect 1 iterate"):
        train_tiny(cfg, char_base, char_tok)
    assert not (Path(cfg.out) / "checkpoints").exists()


@pytest.mark.parametrize(
    ("setting", "value", "match"),
    [
        ("swag_start", 1.0, "--swag-start"),
        ("swag_start", -0.1, "--swag-start"),
        ("swag_rank", 1, "--swag-rank"),
        ("swag_every", -1, "--swag-every"),
        ("swag_lr", 0.0, "--swag-lr"),
        ("swag_scale", float("nan"), "--swag-scale"),
        ("swag_rank", 2.5, "--swag-rank"),
    ],
)
def test_bad_swag_settings_are_refused(tmp_path, data_root, setting, value, match) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_run_config(tmp_path, data_root, "swag", **{setting: value})


def test_saved_adapter_is_the_swa_mean_and_reloads_bit_exact(
    tmp_path, data_root, char_base, char_tok
):
    cfg = tiny_run_config(tmp_path / "swag", data_root, "swag", max_steps=6)
    summary = train_tiny(cfg, char_base, char_tok)
    adapter = Path(cfg.out) / "adapter"
    post = SwagPosterior.load(adapter / POSTERIOR_FILE)
    assert post.count == 3 and post.rank == 5 and post.scale == 0.5
    assert summary["evaluations"][TINY_TASK]["eval_samples"] == 4
    record = summary["swag"]
    assert (record["collected"], record["first_step"], record["every"]) == (3, 4, 1)
    assert record["lr"] == pytest.approx(cfg.loop.lr / 10) and record["deviations"] == 3
    assert record["max_std"] == pytest.approx(float(post.variance().sqrt().max()))

    # plain PEFT loads the SWA mean
    plain = load_plain_adapter(copy.deepcopy(char_base), adapter)
    flat = Binding.for_layout(plain, post.layout, "default").flat()
    assert torch.equal(flat, post.mean.float().double())

    batch, option_ids = eval_batch(char_tok, data_root)
    a = load_run(Path(cfg.out), base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    b = load_run(Path(cfg.out), base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    assert a.method.name == "swag" and a.method.eval_samples(a.model, None) == 15
    torch.manual_seed(0)
    sa = a.method.predict_samples(a.model, batch, option_ids, 3)
    torch.manual_seed(0)
    sb = b.method.predict_samples(b.model, batch, option_ids, 3)
    assert sa.shape == (3, 6, 2) and torch.equal(sa, sb)
    assert (sa[0] - sa[1]).abs().max() > 1e-6  # different weight draws
    # the mean is restored after sampling, and N = 0 is the plain PEFT (SWA) model
    assert torch.equal(Binding.for_layout(a.model, post.layout, "default").flat(), flat)
    with torch.no_grad():
        swa = torch.softmax(answer_logits(plain, batch, option_ids), -1)
    assert torch.equal(a.method.predict_samples(a.model, batch, option_ids, 0)[0], swa)


@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_one_weight_draw_per_forward(tmp_path, data_root, char_base, char_tok, scoring):
    """Sample s is the deterministic prediction of the s-th drawn adapter: every option of a
    question (cloze: its own sequence) and every question of the batch share that draw."""
    from blob_lora.tasks import Scoring

    cfg = tiny_run_config(tmp_path / "swag", data_root, "swag", scoring=scoring, max_length=512)
    metrics = train_tiny(cfg, char_base, char_tok)["evaluations"][TINY_TASK]
    assert metrics["n_examples"] == 6.0 and metrics["eval_samples"] == 4
    run = load_run(Path(cfg.out), base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    batch, option_ids = eval_batch(char_tok, data_root, Scoring(scoring), max_length=512)
    torch.manual_seed(7)
    samples = run.method.predict_samples(run.model, batch, option_ids, 2)
    post = posteriors(run.model)["default"]
    binding = Binding.for_layout(run.model, post.layout, "default")
    torch.manual_seed(7)
    draws = [post.sample(), post.sample()]
    for s, theta in enumerate(draws):
        binding.assign(theta)
        with torch.no_grad():
            expected = torch.softmax(answer_logits(run.model, batch, option_ids), -1)
        assert torch.equal(samples[s], expected), s
    binding.assign(post.mean)


def test_resume_after_a_kill_equals_an_uninterrupted_run(
    tmp_path, data_root, char_base, char_tok, monkeypatch
):
    kw = dict(max_steps=6, checkpoint_every=2, evaluate=False)
    train_tiny(tiny_run_config(tmp_path / "a", data_root, "swag", **kw), char_base, char_tok)

    real_save = ckpt.save_checkpoint
    saved_steps = []

    def save_then_die(root, step, *args, **kwargs):
        real_save(root, step, *args, **kwargs)
        saved_steps.append(step)
        if step == 4:  # one iterate collected (step 4), two to come
            raise KeyboardInterrupt("simulated kill right after the step-4 checkpoint")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    cfg_b = tiny_run_config(tmp_path / "b", data_root, "swag", **kw)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(cfg_b, char_base, char_tok)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert int(state["method"]["swag.count"][0]) == 1
    train_tiny(cfg_b, char_base, char_tok, resume=True)

    for name in ("adapter_model.safetensors", POSTERIOR_FILE):
        a = load_file(tmp_path / "a" / "adapter" / name)
        b = load_file(tmp_path / "b" / "adapter" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_multiswag_members_are_independent_swag_posteriors(
    tmp_path, data_root, char_base, char_tok
):
    cfg = tiny_run_config(tmp_path / "ms", data_root, "multiswag", max_steps=4)
    summary = train_tiny(cfg, char_base, char_tok)
    out = Path(cfg.out)
    assert [m["seed"] for m in summary["members"]] == [1000, 1001]
    assert [m["swag"]["collected"] for m in summary["members"]] == [2, 2]  # steps 3, 4
    member_posts = [
        SwagPosterior.load(out / "adapter" / f"member-{k}" / POSTERIOR_FILE) for k in range(2)
    ]
    assert (member_posts[0].mean - member_posts[1].mean).abs().max() > 1e-3
    for k in range(2):
        run_config = json.loads((out / "members" / str(k) / "run_config.json").read_text())
        assert run_config["method"] == "swag"

    run = load_run(out, base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    assert run.method.name == "multiswag"
    loaded = posteriors(run.model)
    for k, name in enumerate(["m0", "m1"]):
        assert torch.equal(loaded[name].mean, member_posts[k].mean)
    batch, option_ids = eval_batch(char_tok, data_root)
    means = run.method.predict_samples(run.model, batch, option_ids, 0)
    assert means.shape == (2, 6, 2)  # N = 0: each member's SWA mean
    for k in range(2):
        swa = load_plain_adapter(copy.deepcopy(char_base), out / "adapter" / f"member-{k}")
        with torch.no_grad():
            expected = torch.softmax(answer_logits(swa, batch, option_ids), -1)
        torch.testing.assert_close(means[k], expected, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    samples = run.method.predict_samples(run.model, batch, option_ids, 3)
    assert samples.shape == (6, 6, 2)  # M x N draws, member by member
    assert run.model.active_adapter == "m0"


def test_cli_trains_and_evaluates_swag_with_the_same_metrics(tmp_path, data_root):
    from blob_lora.cli.main import main

    model_dir = tiny_model_folder(tmp_path / "model")
    run_dir = tmp_path / "swag"
    common = ["--data-root", str(data_root), "--no-progress"]
    rc = main(
        [
            "train",
            *("--model", str(model_dir), "--task", TINY_TASK, "--method", "swag"),
            *("--out", str(run_dir), "--train-split", TINY_TRAIN_SPLIT),
            *("--eval-split", TINY_EVAL_SPLIT, "--max-steps", "4", "--max-length", "256"),
            *("--lr", "0.01", "--target-modules", "q_proj,v_proj", "--eval-samples", "3"),
            *("--swag-every", "1", "--swag-rank", "3", "--swag-start", "0.25"),
            *common,
        ]
    )
    assert rc == 0
    trained = json.loads((run_dir / "summary.json").read_text())["evaluations"][TINY_TASK]
    assert trained["method"] == "swag" and trained["eval_samples"] == 3
    assert trained["mean_epistemic_uncertainty"] > 0  # the draws disagree
    rc = main(["evaluate", "--run", str(run_dir), "--out", str(tmp_path / "again"), *common])
    assert rc == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["method"] == "swag" and again["eval_samples"] == 3
    # the same metrics, and the seed 'evaluate' draws its samples with (the evaluation after
    # training continues the run's own stream, so the values themselves differ)
    # (and the key by which the same evaluate made again returns this one)
    expected = trained.keys() | {"eval_seed", "evaluation_key"}
    assert again.keys() == expected and again["n_examples"] == 6.0
    assert again["eval_seed"] == 0
    assert 0 <= again["accuracy"] <= 1 and again["nll"] > 0
    assert again["mean_epistemic_uncertainty"] > 0
    assert SwagPosterior.load(run_dir / "adapter" / POSTERIOR_FILE).count == 3


def test_predictor_recognises_swag_and_splits_the_uncertainty(
    tmp_path, data_root, char_base, char_tok
):
    from blob_lora.prediction import EarlyStop, Predictor

    cfg = tiny_run_config(tmp_path / "swag", data_root, "swag", evaluate=False)
    train_tiny(cfg, char_base, char_tok)
    run = load_run(Path(cfg.out), base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    questions = [
        {"question": "the cat sat on the _", "choices": ["mat", "hat"]},
        {"question": "a dog ran to the _", "choices": ["park", "car", "sea"]},
    ]
    # no method given: the model is recognised by what it carries
    predictor = Predictor(run.model, char_tok, n_samples=4, seed=3, max_length=256)
    assert predictor.method.name == "swag"
    rows = predictor.predict(questions)
    again = Predictor(run.model, char_tok, n_samples=4, seed=3, max_length=256).predict(questions)
    assert rows == again  # a fixed seed reproduces the draws
    for row in rows:
        assert row["epistemic"] > 0
        assert row["total"] == pytest.approx(row["aleatoric"] + row["epistemic"], abs=1e-9)
    # independent draws per call: early stopping may run
    early = Predictor(
        run.model, char_tok, n_samples=8, mode="early", early=EarlyStop(tol=1.0), max_length=256
    )
    assert all(r["n_samples"] < 8 for r in early.predict(questions))


def test_a_learning_curve_during_collection_leaves_the_run_unchanged(
    tmp_path, data_root, char_base, char_tok
):
    """The curve draws SWAG samples mid-training (from the moments so far, or the current
    weights before the first collection); the iterate must be restored exactly after each."""
    kw = dict(max_steps=6, evaluate=False, curve_samples=2)
    plain = tiny_run_config(tmp_path / "plain", data_root, "swag", **kw)
    train_tiny(plain, char_base, char_tok)
    curved = tiny_run_config(
        tmp_path / "curved", data_root, "swag", curve_every=1, curve_split="train_s[8:12]", **kw
    )
    train_tiny(curved, char_base, char_tok)
    curve = (Path(curved.out) / "curve.jsonl").read_text().splitlines()
    assert len(curve) == 6
    for name in ("adapter_model.safetensors", POSTERIOR_FILE):
        a = load_file(Path(plain.out) / "adapter" / name)
        b = load_file(Path(curved.out) / "adapter" / name)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_a_posterior_that_does_not_belong_to_the_adapter_is_refused(
    tmp_path, data_root, char_base, char_tok
):
    from blob_lora.utils.errors import CheckpointError

    cfg = tiny_run_config(tmp_path / "swag", data_root, "swag", evaluate=False)
    train_tiny(cfg, char_base, char_tok)
    path = Path(cfg.out) / "adapter" / POSTERIOR_FILE
    post = SwagPosterior.load(path)
    post.mean[0] += 1e-3  # another run's moments
    post.save(path)
    with pytest.raises(CheckpointError, match="does not hold the SWA mean"):
        load_run(Path(cfg.out), base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    path.unlink()
    with pytest.raises(CheckpointError, match="holds no SWAG posterior"):
        load_run(Path(cfg.out), base_model=copy.deepcopy(char_base), tokenizer=char_tok)
