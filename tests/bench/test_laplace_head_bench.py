"""Smoke test of bench/laplace_head.py on its tiny setting, with the dense limit under the tiny
vocabulary so that the head's output factor is sketched as on the real model."""

from __future__ import annotations

import json

from tests.conftest import load_script


def test_laplace_head_bench_fits_with_a_sketched_head(tmp_path, data_root) -> None:
    module = load_script("bench/laplace_head.py", "bench_laplace_head")
    out = tmp_path / "report.json"
    module.main(
        [
            "--setting", "tiny",
            "--data-root", str(data_root),
            "--n-questions", "6",
            "--batch", "3",
            "--g-rank", "5",
            "--g-dense-limit", "40",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    vocab = report["vocab"]
    assert report["questions"] == 6 and report["dense_head_g_bytes"] == vocab * vocab * 8
    (head, kept), *rest = report["g_sketch_trace_kept"].items()
    assert not rest and "lm_head" in head and 0.0 < kept <= 1.0
    assert 1 <= report["head_g_rank"] <= 5
    assert set(report["g_sketch_curvature_lost"]) == {head}
    assert report["g_sketch_curvature_lost"][head] >= 0.0
    assert report["fit_seconds"] > 0 and report["lora_pass_seconds"] > 0
    assert report["predictive_seconds_per_question"] > 0
    # the default keeps the sketch's residual diagonal; the same fit without it is timed too
    assert report["g_residual"] == "diag"
    without = report["without_residual"]
    assert without["predictive_seconds_per_question"] > 0 and without["prior_precision"] > 0
