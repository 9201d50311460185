"""SWAG-LoRA end to end on the real SmolLM2-135M (slow: run with `make test-all`), with LoRA on
the tied output head too."""

from __future__ import annotations

import json

import pytest

from blob_lora.cli.main import main
from blob_lora.methods.swag import POSTERIOR_FILE, SwagPosterior

pytestmark = pytest.mark.slow


def test_smollm2_swag_train_and_evaluate(tmp_path, data_root) -> None:
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            *("--model", "smollm2-135m", "--task", "openbookqa", "--method", "swag"),
            *("--train-split", "train[:32]", "--eval-split", "validation[:24]"),
            *("--max-steps", "8", "--batch-size", "4", "--lr", "1e-3", "--seed", "1"),
            *("--max-length", "160", "--eval-samples", "3"),
            *("--swag-every", "1", "--swag-start", "0.5"),
            *("--target-modules", r".*\.layers\.29\.self_attn\.(q_proj|v_proj)|.*lm_head"),
            *("--data-root", str(data_root), "--out", str(run), "--no-progress"),
        ]
    )
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["swag"]["collected"] == 4 and summary["swag"]["max_std"] > 0
    metrics = summary["evaluations"]["openbookqa"]
    assert metrics["n_examples"] == 24 and metrics["eval_samples"] == 3
    assert metrics["mean_epistemic_uncertainty"] > 0
    post = SwagPosterior.load(run / "adapter" / POSTERIOR_FILE)
    assert any("lm_head" in name for name in post.layout.names)
    rc = main(
        [
            "evaluate",
            *("--run", str(run), "--task", "arc_easy", "--split", "validation[:16]"),
            *("--eval-samples", "0", "--out", str(tmp_path / "swa"), "--no-progress"),
        ]
    )
    assert rc == 0
    swa = json.loads((tmp_path / "swa" / "metrics.json").read_text())
    assert swa["n_examples"] == 16 and swa["eval_samples"] == 0
