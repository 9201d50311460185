"""Smoke test of bench/inducing_factors.py on the CPU: every row is timed and reported."""

from __future__ import annotations

import json

from tests.conftest import load_script


def test_inducing_factors_bench_times_the_draw_and_the_small_operations(tmp_path) -> None:
    module = load_script("bench/inducing_factors.py", "bench_inducing_factors")
    out = tmp_path / "report.json"
    report = module.main(["--device", "cpu", "--width", "64", "--iters", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["config"] == {
        "device": "cpu",
        "width": 64,
        "rank": 8,
        "iters": 2,
        "eval_samples": 4,
    }
    assert list(report["ms_per_call"]) == [
        "draw (A and B, fwd + bwd)",
        "evaluation draw (A and B, N = 4, no grad)",
        "evaluation draw, factorisations pinned",
        "linalg.cholesky (fwd + bwd)",
        "linalg.cholesky_ex (fwd + bwd)",
        "cholesky_solve (fwd + bwd)",
        "2 x solve_triangular (fwd + bwd)",
    ]
    assert all(ms > 0 for ms in report["ms_per_call"].values())
    # two factors, each with four factorisations, two solves and their backward: hundreds
    assert report["leaf_ops_per_draw"] > 200
    # the factorisations are a part of the draw, a large one
    assert 100 < report["leaf_ops_of_its_factorisations"] < report["leaf_ops_per_draw"]
    # pinned, an evaluation draw skips the factorisations: fewer operations, not none
    ops = report["leaf_ops_per_evaluation_draw"]
    assert 0 < ops["pinned"] < ops["unpinned"] < report["leaf_ops_per_draw"]
    assert report["syncing_ops_in_one_draw"] == []  # only looked for on CUDA
