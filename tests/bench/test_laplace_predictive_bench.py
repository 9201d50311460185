"""Smoke test of bench/laplace_predictive.py on its tiny setting, the head's output factor
sketched as on the real model so that both projections take their outside-the-subspace path
(the bench itself asserts that their covariances agree)."""

from __future__ import annotations

import json

from tests.conftest import load_script


def test_laplace_predictive_bench_times_both_projections(tmp_path, data_root) -> None:
    module = load_script("bench/laplace_predictive.py", "bench_laplace_predictive")
    out = tmp_path / "report.json"
    module.main(
        [
            "--setting", "tiny",
            "--data-root", str(data_root),
            "--n-fit", "4",
            "--n-questions", "4",
            "--batch", "2",
            "--g-rank", "5",
            "--g-dense-limit", "40",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["fit_questions"] == 4 and report["questions"] == 4
    assert set(report["seconds_per_question"]) == {"lora", "jacobian_first", "positionwise"}
    assert all(v > 0 for v in report["seconds_per_question"].values())
    assert report["covariance_max_relative_difference"] < 1e-8
