"""The learning curve (--curve-every): held-out training examples scored during training,
without changing what is learned."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blob_lora.pipeline import train
from blob_lora.training import TrainConfig
from blob_lora.utils.errors import ConfigError
from tests.training.test_train_loop import tiny_cfg


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_curve_records_held_out_metrics_and_changes_nothing_else(
    tmp_path, data_root, tiny_model_dir, scoring
) -> None:
    common = dict(method="blob", train_split="train[8:24]", scoring=scoring, evaluate=False)
    plain = tiny_cfg(tmp_path / "a", data_root, tiny_model_dir, **common)
    train(plain, progress=False)
    curved = tiny_cfg(
        tmp_path / "b",
        data_root,
        tiny_model_dir,
        curve_every=3,
        curve_split="train[:8]",
        curve_samples=2,
        **common,
    )
    train(curved, progress=False)
    rows = [
        json.loads(x) for x in (tmp_path / "b" / "run" / "curve.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [3, 6, 8]  # every 3 steps and after the last (8)
    for r in rows:
        assert r["n_examples"] == 8 and r["eval_samples"] == 2
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["nll"] > 0
    assert len({r["nll"] for r in rows}) > 1  # the model changes between points
    # scoring the curve drew no random numbers from training's stream: the same adapter (to
    # float rounding: the evaluations in between may change memory alignment, and with it the
    # last bit of some CPU kernels, amplified to ~2e-6 by 8 steps at lr 2e-2; drawing the
    # curve's samples from training's stream moves it by 2.5e-4, measured)
    a, b = _adapter(tmp_path / "a" / "run"), _adapter(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=0)


def test_curve_needs_a_held_out_split() -> None:
    with pytest.raises(ConfigError, match="--curve-split"):
        TrainConfig(curve_every=10)
