"""The composite pipeline (``blob_lora.pipeline.composite``): sub-runs trained by the plain
pipeline, a resumed run reusing the finished ones, and sub-runs that are never composite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blob_lora.pipeline.composite as composite
from blob_lora.training.trainer import RunStart
from blob_lora.utils.errors import ConfigError
from tests.factories import TINY_TASK, tiny_run_config, train_tiny

torch.set_num_threads(1)


def test_ensemble_resume_reuses_finished_members(
    tmp_path, data_root, char_base, char_tok, monkeypatch
):
    cfg = tiny_run_config(tmp_path / "ensemble", data_root, "ensemble")
    train_tiny(cfg, char_base, char_tok)
    out = Path(cfg.out)
    first = (out / "members" / "0" / "adapter" / "adapter_model.safetensors").read_bytes()
    (out / "summary.json").unlink()  # as if interrupted after the members

    real_train = composite.train_plain
    calls = []

    def counting(c, method, **kw):
        calls.append(c.method)
        return real_train(c, method, **kw)

    monkeypatch.setattr(composite, "train_plain", counting)
    summary = train_tiny(cfg, char_base, char_tok, resume=True)
    assert calls == []  # both members were finished: not trained again
    assert (out / "members" / "0" / "adapter" / "adapter_model.safetensors").read_bytes() == first
    assert summary["evaluations"][TINY_TASK]["eval_samples"] == 2


def test_a_sub_run_is_never_composite(tmp_path, data_root) -> None:
    cfg = tiny_run_config(tmp_path / "ensemble", data_root, "ensemble")
    with pytest.raises(ConfigError, match="cannot itself be composite"):
        composite.train_sub_run(cfg, tmp_path / "ensemble" / "sub", RunStart(), method="tfb")


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_settings_a_sub_run_refuses_leave_no_run_behind(tmp_path, data_root, char_base, char_tok):
    """A composite claims its folder before its sub-runs read their settings; a refusal there
    used to leave a run_config.json that blocked the corrected command (and that --resume
    could not continue: the same settings fail again)."""
    out = tmp_path / "multiswag"
    refused = tiny_run_config(out, data_root, "multiswag", swag_every=0)  # once per epoch: 1
    with pytest.raises(ConfigError, match="SWAG would collect 1 iterate"):
        train_tiny(refused, char_base, char_tok)
    assert not out.exists()
    summary = train_tiny(tiny_run_config(out, data_root, "multiswag"), char_base, char_tok)
    assert summary["evaluations"][TINY_TASK]["accuracy"] >= 0  # the corrected run starts


def test_overwrite_with_refused_settings_keeps_the_run_it_was_to_replace(
    tmp_path, data_root, char_base, char_tok
):
    out = tmp_path / "ensemble"
    train_tiny(tiny_run_config(out, data_root, "ensemble"), char_base, char_tok)
    before = files(out)
    bad = tiny_run_config(out, data_root, "ensemble", target_modules=["no_such_module"])
    with pytest.raises(ConfigError, match="no_such_module"):
        train_tiny(bad, char_base, char_tok, overwrite=True)
    assert files(out) == before  # put back, bit for bit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ensemble"]  # nothing set aside left


def test_overwrite_that_trains_deletes_the_replaced_run(tmp_path, data_root, char_base, char_tok):
    out = tmp_path / "ensemble"
    train_tiny(tiny_run_config(out, data_root, "ensemble"), char_base, char_tok)
    train_tiny(
        tiny_run_config(out, data_root, "ensemble", lr=5e-3), char_base, char_tok, overwrite=True
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ensemble"]
    assert '"lr": 0.005' in (out / "members" / "0" / "run_config.json").read_text()


def test_a_replaced_run_comes_back_when_the_new_folder_cannot_be_made(
    tmp_path, data_root, monkeypatch
) -> None:
    out = tmp_path / "ensemble"
    out.mkdir()
    (out / "run_config.json").write_text("{}")
    (out / "summary.json").write_text('{"kept": true}')
    before = files(out)

    def fails(folder, *args, **kwargs):
        folder.mkdir()  # made, but its settings file cannot be written
        raise OSError("disk full")

    monkeypatch.setattr(composite, "prepare_run_dir", fails)
    with pytest.raises(OSError, match="disk full"):
        composite.claim_run_dir(
            tiny_run_config(out, data_root, "ensemble"), overwrite=True, resume=False
        )
    assert files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ensemble"]


def test_a_composite_reports_the_same_numbers_after_its_sub_runs_were_finished(
    tmp_path, data_root, char_base, char_tok
):
    """Laplace's predictive draws from torch's generator. After sub-runs finished in an earlier
    sitting (or copied with --reuse) nothing had seeded it, so a resumed composite reported
    other numbers at every call; its evaluation is seeded by the run's seed now."""
    cfg = tiny_run_config(tmp_path / "laplace", data_root, "laplace")
    first = train_tiny(cfg, char_base, char_tok)["evaluations"][TINY_TASK]
    again = []
    for before in (1, 2):
        (Path(cfg.out) / "summary.json").unlink()  # as if stopped after the MAP sub-run
        # and killed in the fit: its temporary folder is cleared by the resumed assembly
        (Path(cfg.out) / ".adapter.killed.tmp").mkdir()
        torch.manual_seed(before)  # whatever the new process drew from
        again.append(train_tiny(cfg, char_base, char_tok, resume=True)["evaluations"][TINY_TASK])
    assert first["eval_seed"] == 1
    for metrics in again:
        assert (metrics["nll"], metrics["ece"]) == (first["nll"], first["ece"])
    assert not list(Path(cfg.out).glob(".adapter.*.tmp"))


@pytest.mark.parametrize("method", ["laplace", "multiswag"])
def test_evaluate_with_the_runs_seed_repeats_its_end_of_training_numbers(
    method, tmp_path, data_root, char_base, char_tok
) -> None:
    """A composite's end-of-training evaluation is seeded by the run's seed, so evaluate
    --seed <that seed> scores it again to the same numbers: the same batches (by length, on
    one process, where training's evaluation had taken the split in order) meet the same
    weight samples."""
    import copy

    from blob_lora.pipeline.evaluate_saved import evaluate_saved_run
    from blob_lora.training.saved_run import load_run

    cfg = tiny_run_config(tmp_path / method, data_root, method, eval_batch_size=2)
    end = train_tiny(cfg, char_base, char_tok)["evaluations"][TINY_TASK]
    loaded = load_run(cfg.out, base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    again = evaluate_saved_run(loaded, cfg.out, out=tmp_path / "again", seed=cfg.loop.seed)
    assert again["eval_samples"] == end["eval_samples"] > 1
    assert (again["nll"], again["ece"], again["brier"]) == (end["nll"], end["ece"], end["brier"])
