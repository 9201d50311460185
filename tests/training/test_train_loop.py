"""The training loop on a tiny model with a few real records: learning, resuming, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from blob_lora.cli.main import main
from blob_lora.pipeline import train
from blob_lora.training import TrainConfig
from blob_lora.training import checkpoint as ckpt
from blob_lora.utils.errors import BlobLoraError


def tiny_cfg(tmp_path, data_root, tiny_model_dir, **kw) -> TrainConfig:
    base = dict(
        model=str(tiny_model_dir),
        task="arc_easy",
        data_root=str(data_root),
        train_split="train[:24]",
        eval_split="validation[:10]",
        out=str(tmp_path / "run"),
        batch_size=4,
        eval_batch_size=5,
        max_steps=8,
        lr=2e-2,
        max_length=96,
        eval_samples=3,
        target_modules=["q_proj", "v_proj", "lm_head"],
    )
    base.update(kw)
    return TrainConfig(**base)


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "blob"])
def test_loss_falls_and_run_folder_is_complete(tmp_path, data_root, tiny_model_dir, method) -> None:
    cfg = tiny_cfg(
        tmp_path,
        data_root,
        tiny_model_dir,
        method=method,
        max_steps=24,
        epochs=None,
        kl_schedule="uniform",
    )
    summary = train(cfg, progress=False)
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(1, 25))
    first = sum(r["nll"] for r in log[:6]) / 6
    last = sum(r["nll"] for r in log[-6:]) / 6
    assert last < first - 0.05, (first, last)
    m = summary["evaluations"]["arc_easy"]
    assert m["n_examples"] == 10 and 0 <= m["ece"] <= 1
    # --eval-samples is honoured by BLoB; LoRA's one deterministic pass is N = 0 whatever N
    assert m["eval_samples"] == (3 if method == "blob" else 0)
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "eval" / "arc_easy" / "metrics.json").is_file()
    assert (run / "eval" / "arc_easy" / "reliability.png").is_file()
    preds = (run / "eval" / "arc_easy" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 10
    if method == "blob":
        assert all(r["kl"] > 0 for r in log)
        assert all(abs(r["pi"] - 1 / summary["kl_cycle"]) < 1e-12 for r in log)


@pytest.mark.parametrize("method", ["blob", "bayesian-lora"])
def test_resume_after_interruption_equals_uninterrupted(
    tmp_path, data_root, tiny_model_dir, monkeypatch, method
) -> None:
    kw = dict(method=method, max_steps=7, checkpoint_every=3, evaluate=False, batch_size=4)
    full = train(tiny_cfg(tmp_path / "a", data_root, tiny_model_dir, **kw), progress=False)
    assert full["steps"] == 7

    real_save = ckpt.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated kill right after the step-3 checkpoint")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    cfg_b = tiny_cfg(tmp_path / "b", data_root, tiny_model_dir, **kw)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    with pytest.raises(BlobLoraError, match="--resume"):
        train(cfg_b, progress=False)
    real_load = ckpt.load_checkpoint

    def load_after_an_hour(path):  # as if the first sitting had trained for an hour
        state = real_load(path)
        assert state["state"]["train_seconds"] > 0
        state["state"]["train_seconds"] = 3600.0
        return state

    monkeypatch.setattr(ckpt, "load_checkpoint", load_after_an_hour)
    resumed = train(cfg_b, resume=True, progress=False)
    assert resumed["steps"] == 7 and resumed["mixed_precision"] == "no"
    # the summary counts both sittings, not only the time after the resume
    assert 3600 < resumed["train_seconds"] < 3600 + 600

    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in _log(tmp_path / "b" / "run")] == list(range(1, 8))


def test_resume_refuses_changed_settings(tmp_path, data_root, tiny_model_dir) -> None:
    cfg = tiny_cfg(tmp_path, data_root, tiny_model_dir, method="lora", max_steps=2, evaluate=False)
    train(cfg, progress=False)
    changed = tiny_cfg(
        tmp_path, data_root, tiny_model_dir, method="lora", max_steps=2, lr=0.5, evaluate=False
    )
    with pytest.raises(BlobLoraError, match="lr"):
        train(changed, resume=True, progress=False)


def test_cli_train_then_evaluate(tmp_path, data_root, tiny_model_dir, capsys) -> None:
    run = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text("max-steps: 2\nbatch_size: 4\nlr: 0.01\neval-samples: 2\n")
    rc = main(
        [
            "train",
            "--config",
            str(config),
            "--model",
            str(tiny_model_dir),
            "--task",
            "arc_easy",
            "--method",
            "blob",
            "--max-steps",
            "3",
            "--seed",
            "2",
            "--max-length",
            "96",
            "--train-split",
            "train[:12]",
            "--eval-split",
            "validation[:6]",
            "--data-root",
            str(data_root),
            "--out",
            str(run),
            "--no-progress",
        ]
    )
    assert rc == 0
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["max_steps"] == 3 and saved["batch_size"] == 4 and saved["eval_samples"] == 2
    out_dir = tmp_path / "ev"
    rc = main(
        [
            "evaluate",
            "--run",
            str(run),
            "--task",
            "arc_easy",
            "--split",
            "validation[:7]",
            "--eval-samples",
            "0",
            "--out",
            str(out_dir),
            "--no-progress",
        ]
    )
    assert rc == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert {"accuracy", "ece", "nll", "brier", "n_examples"} <= metrics.keys()
    assert metrics["n_examples"] == 7 and metrics["eval_samples"] == 0
    assert len((out_dir / "predictions.jsonl").read_text().splitlines()) == 7
    # A second train into the same folder is refused with a clear message (exit 2).
    rc = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--task",
            "arc_easy",
            "--out",
            str(run),
            "--data-root",
            str(data_root),
            "--max-steps",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--method", "bayes"], "unknown method"),
        (["--flipout", "layer"], "--flipout"),
        (["--task", "nope"], "nope"),
    ],
)
def test_cli_bad_input_is_one_clear_line(
    tmp_path, data_root, tiny_model_dir, capsys, args, needle
) -> None:
    rc = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--task",
            "arc_easy",
            "--out",
            str(tmp_path / "r"),
            "--data-root",
            str(data_root),
            "--max-steps",
            "1",
            "--no-progress",
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_steps_yields_every_optimizer_step_like_run(tmp_path, data_root, tiny_model_dir) -> None:
    """``TrainingLoop.steps()`` (what bench/train_full_step.py drives) takes the same steps as
    ``run()``: across an epoch boundary whose last accumulation window is short, and with the
    same parameters at the end."""
    from blob_lora.methods import get_method
    from blob_lora.training.trainer import RunStart, prepare_training

    def trained(out: str, stepwise: bool) -> tuple[list[int], dict[str, torch.Tensor]]:
        # 24 examples / batch 4 = 6 micro-batches per epoch, grad_accum 4: steps of 4 and 2
        cfg = tiny_cfg(tmp_path, data_root, tiny_model_dir, method="blob", out=out,
                       grad_accum=4, max_steps=5, evaluate=False)  # fmt: skip
        prepared = prepare_training(cfg, get_method("blob"), RunStart(progress=False))
        loop = prepared.loop
        loop.start(False, prepared.inputs.dataset, False)
        torch.manual_seed(5)
        if stepwise:
            seen = list(loop.steps())
        else:
            loop.run()
            seen = [r["step"] for r in _log(tmp_path / out)]
        assert (loop.step, loop.epoch, loop.micro_done) == (5, 2, 4)
        params = {n: p.detach().clone() for n, p in prepared.unwrapped.named_parameters()
                  if p.requires_grad}  # fmt: skip
        return seen, params

    seen, by_steps = trained(str(tmp_path / "a"), stepwise=True)
    assert seen == [1, 2, 3, 4, 5]
    _, by_run = trained(str(tmp_path / "b"), stepwise=False)
    for name, value in by_steps.items():
        torch.testing.assert_close(value, by_run[name], rtol=0, atol=0)


def test_a_target_suffix_that_adapts_nothing_is_named_in_a_warning(
    tmp_path, data_root, tiny_model_dir
) -> None:
    """PEFT drops a ``--target-modules`` suffix that matches nothing as long as another one
    matches: GPT-2's ``c_attn`` in a Llama list here (the default list on GPT-2 the other way
    round) would otherwise leave the user believing those modules were adapted."""
    import warnings

    from blob_lora.methods import get_method
    from blob_lora.training.trainer import RunStart, prepare_training

    def warnings_of(targets: list[str], out: str) -> list[str]:
        cfg = tiny_cfg(tmp_path, data_root, tiny_model_dir, out=str(tmp_path / out),
                       target_modules=targets)  # fmt: skip
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            prepare_training(cfg, get_method("blob"), RunStart(progress=False))
        return [str(w.message) for w in seen if "--target-modules" in str(w.message)]

    said = warnings_of(["q_proj", "c_attn", "lm_head", "c_fc"], "a")
    assert len(said) == 1
    assert said[0].startswith("--target-modules c_attn,c_fc matched no module of ")
    assert "adapted: lm_head,q_proj (3 modules)" in said[0]  # 2 blocks' q_proj + the head
    assert warnings_of(["q_proj", "v_proj"], "b") == []
    assert warnings_of([r".*\.(q_proj|c_attn)"], "c") == []  # a regex is PEFT's to match
    # an expression among other entries adapts what it matches (not taken for a suffix)
    cfg = tiny_cfg(tmp_path, data_root, tiny_model_dir, out=str(tmp_path / "d"),
                   target_modules=[r".*layers\.1\.self_attn\.(q_proj|v_proj)", "lm_head"])  # fmt: skip
    model = prepare_training(cfg, get_method("lora"), RunStart(progress=False)).loop.unwrapped
    assert sorted(model.base_model.targeted_module_names) == [
        "lm_head", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    ]  # fmt: skip
    said = warnings_of([r".*\.c_attn", "q_proj", r".*\.(v_proj)"], "e")
    assert len(said) == 1 and said[0].startswith(r"--target-modules .*\.c_attn matched no module")


def test_unmatched_target_suffixes_are_the_ones_no_adapted_name_ends_with() -> None:
    from blob_lora.tuners.lora import LoraSettings

    adapted = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]
    settings = LoraSettings(target_modules=["q_proj", "v_proj", "lm_head", "proj"])
    assert settings.unmatched(adapted) == ["v_proj", "proj"]  # a suffix ends at a dot
    assert LoraSettings(target_modules=["self_attn.q_proj"]).unmatched(adapted) == []
    mixed = LoraSettings(target_modules=[r".*\.1\.self_attn\.(q|k)_proj", "lm_head", r".*\.mlp"])
    assert mixed.unmatched(adapted) == [r".*\.mlp"]  # an expression is matched whole


def test_expressions_joined_with_other_entries_keep_their_flags_and_bad_ones_are_refused():
    import re

    from blob_lora.tuners.lora import LoraSettings, target_modules_arg
    from blob_lora.utils.errors import ConfigError

    joined = target_modules_arg(["(?i).*Q_PROJ", "lm_head"])  # a global flag, not first now
    assert re.fullmatch(joined, "model.layers.0.self_attn.q_proj")
    assert re.fullmatch(joined, "lm_head") and not re.fullmatch(joined, "LM_HEAD")
    with pytest.raises(ConfigError, match=r"--target-modules has an invalid regular expression"):
        LoraSettings(target_modules=["[q_proj", "lm_head"])


def test_bucketed_batches_resume_only_at_their_per_process_batch_size(
    tmp_path, data_root, tiny_model_dir, monkeypatch
) -> None:
    kw = dict(method="lora", max_steps=4, checkpoint_every=2, evaluate=False)
    cfg = tiny_cfg(tmp_path, data_root, tiny_model_dir, bucket_by_length=True, **kw)
    real_save = ckpt.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated kill right after the step-2 checkpoint")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    # the same global batch (2 x 2 accumulated), other length buckets: refused, naming the size
    relaid = cfg.replace(batch_size=2, grad_accum=2)
    with (
        pytest.warns(UserWarning, match="--bucket-by-length forms batches"),
        pytest.raises(BlobLoraError, match="formed at --batch-size 4 per process"),
    ):
        train(relaid, resume=True, progress=False)
    assert train(cfg, resume=True, progress=False)["steps"] == 4


def test_layouts_a_global_batch_does_not_fix_are_warned_about(tmp_path, data_root, tiny_model_dir):
    import warnings

    from blob_lora.training.setup import _warn_layout_dependence

    cfg = tiny_cfg(tmp_path, data_root, tiny_model_dir, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # a training set that is not a multiple of processes x batch trains as on one process
        # (training.even_batches; tests/distributed/test_two_processes.py): nothing to warn
        _warn_layout_dependence(cfg, 2)
        _warn_layout_dependence(cfg.replace(bucket_by_length=True), 1)
    bucketed = cfg.replace(bucket_by_length=True)
    with pytest.warns(UserWarning, match="--bucket-by-length forms batches of --batch-size"):
        _warn_layout_dependence(bucketed, 2)
    with pytest.warns(UserWarning, match="--bucket-by-length forms batches of --batch-size"):
        _warn_layout_dependence(bucketed.replace(grad_accum=2), 1)


def test_a_mixed_precision_without_autocast_is_recorded_as_none() -> None:
    from blob_lora.training.distributed import effective_precision

    # Accelerate on a CPU accepts fp16 but has no autocast for it (native_amp false): the steps
    # run in float32, and summary.json must not say fp16
    assert effective_precision("fp16", native_amp=False) == "no"
    assert effective_precision("bf16", native_amp=True) == "bf16"
    assert effective_precision("no", native_amp=False) == "no"
    # and train warns where the requested precision does not take effect
    from types import SimpleNamespace

    from blob_lora.training.distributed import warn_ineffective_precision

    cpu = torch.device("cpu")
    fp16 = SimpleNamespace(mixed_precision="fp16", native_amp=False, device=cpu)
    with pytest.warns(UserWarning, match="mixed precision fp16 has no effect on cpu"):
        assert warn_ineffective_precision(fp16) == "no"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf16 = SimpleNamespace(mixed_precision="bf16", native_amp=True, device=cpu)
        assert warn_ineffective_precision(bf16) == "bf16"
