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
