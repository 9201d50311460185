"""Smoke test of bench/train_step.py: the tiny setting runs end to end and writes every row."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script

ROWS = {
    "lora",
    "blob-token",
    "blob-sequence",
    "blob-shared",
    "blob-token-2pass",
    "swag-collect",
    "bayesian-lora",
    "bayesian-lora-every",
}


@pytest.fixture(scope="module")
def train_step():
    return load_script("bench/train_step.py", "bench_train_step")


def _check(report_path, batch_sizes, seq_len, dtype):
    data = json.loads(report_path.read_text())
    assert data["config"]["dtype"] == dtype
    assert data["config"]["seq_len"] == seq_len
    assert [r["batch_size"] for r in data["results"]] == batch_sizes
    for res in data["results"]:
        rows = {r["method"]: r for r in res["rows"]}
        assert set(rows) == ROWS
        assert rows["lora"]["time_ratio"] == pytest.approx(1.0)
        assert rows["lora"]["peak_ratio"] == pytest.approx(1.0)
        for row in rows.values():
            assert len(row["times_s"]) == 1
            assert row["median_s"] > 0
            assert row["time_ratio"] > 0
            assert row["peak_bytes"] > 0
            assert row["peak_ratio"] > 0
    params = data["config"]["trainable_params"]
    # BLoB adds a std the shape of every A on top of LoRA's A and B.
    assert params["blob-token"] > params["lora"]
    assert params["swag-collect"] == params["lora"]  # SWAG trains LoRA's tensors only
    assert params["bayesian-lora"] != params["lora"]  # inducing posteriors replace A and B
    # v_proj's plain A and B (the default) in place of its two posteriors (every target)
    assert params["bayesian-lora"] != params["bayesian-lora-every"]
    assert data["machine"]["torch"]
    assert data["machine"]["cpu_count"] >= 1
    assert len(data["tables_markdown"]) == len(batch_sizes)


def test_tiny_setting(train_step, tmp_path):
    out = tmp_path / "tiny.json"
    train_step.main(["--setting", "tiny", "--warmup", "1", "--steps", "1", "--out", str(out)])
    _check(out, [2], 16, "float32")


def test_gpu_code_path_on_cpu(train_step, tmp_path):
    """The --setting gpu path (bf16 base, two batch sizes) with a tiny config on the CPU."""
    out = tmp_path / "gpu.json"
    train_step.main(
        [
            "--setting", "gpu", "--device", "cpu", "--tiny-shape", "--batch-sizes", "2", "3",
            "--seq-len", "8", "--warmup", "1", "--steps", "1", "--out", str(out),
        ]
    )  # fmt: skip
    _check(out, [2, 3], 8, "bfloat16")
