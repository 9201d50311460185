"""Smoke tests of bench/predictive.py: both settings end to end on tiny models (no GPU, no
SmolLM2), checking that every row is measured and judged."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/predictive.py", "bench_predictive")


def test_gpu_code_path_on_cpu_with_tiny_shape(bench, tmp_path):
    out = tmp_path / "gpu.json"
    bench.main(
        ["--setting", "gpu", "--tiny-shape", "--device", "cpu", "--warmup", "0", "--steps", "1", "--seq-len", "16",
         "--last-k", "4", "1", "--modes", "fold:3", "prefix:3", "prefix-early:3", "--out", str(out)]
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["shape"] == "tiny" and data["dtype"] == "bfloat16" and data["seq_len"] == 16
    full, top = data["results"]
    assert full["bayesian"] == "all blocks" and top["bayesian"] == "last 1 blocks"
    assert [r["name"] for r in full["rows"]] == ["lora (1 pass)", "fold N=3"]  # no prefix there
    rows = {r["name"]: r for r in top["rows"]}
    assert rows["lora (1 pass)"]["x_lora"] == pytest.approx(1.0)
    assert rows["prefix N=3"]["mode_used"] == "prefix"
    assert rows["prefix-early N<=3 tol=0.01"]["mode_used"] == "prefix-early"
    assert 2 <= rows["prefix-early N<=3 tol=0.01"]["mean_samples_used"] <= 3
    assert all(r["latency_s"] > 0 and len(r["times_s"]) == 1 for r in rows.values())
    assert len(data["tables_markdown"]) == 2 and data["machine"]["torch"]


def test_cpu_setting_on_a_tiny_run(bench, run_dir, data_root, tmp_path):
    out = tmp_path / "cpu.json"
    report = bench.main(
        ["--run", str(run_dir), "--task", "winogrande_s", "--eval-split", "validation[:5]",
         "--data-root", str(data_root), "--batch-size", "3", "--n", "4", "--threads", "1",
         "--modes", "mean", "fold:4", "fold:4~", "prefix:4", "prefix-early:4@1.0", "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text())["rows"] == report["rows"]
    rows = {r["name"]: r for r in report["rows"]}
    assert report["n_examples"] == 5 and report["bayesian_layers"]["prefix_blocks"] == 1
    fold, prefix = rows["fold N=4"], rows["prefix N=4"]
    # same seed per batch: prefix reuse reproduces the full predictive's quality exactly
    assert prefix["nll"] == pytest.approx(fold["nll"], abs=1e-6)
    assert prefix["d_ece"] == pytest.approx(0.0, abs=1e-6)
    assert "meets_full_target" in fold and fold["d_nll"] == 0
    assert rows["prefix-early N<=4 tol=1"]["mean_samples_used"] == 3  # stops after the min group
    other = rows["fold N=4, other noise"]  # same mode, other noise: the Monte-Carlo floor
    assert other["other"] and other["d_nll"] != 0 and "meets_full_target" not in other
    assert rows["mean (N=0)"]["mean_epistemic"] is None
    assert rows["lora (1 pass)"]["x_lora"] == pytest.approx(1.0)
    # mean weights = plain LoRA: same predictive
    assert rows["mean (N=0)"]["nll"] == pytest.approx(rows["lora (1 pass)"]["nll"], abs=1e-9)
