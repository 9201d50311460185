"""Smoke test of bench/head_rows.py on its tiny setting: the counted head positions are ordered
as the gather promises (needed <= gathered < whole suffix) and the three arms are timed alike."""

from __future__ import annotations

import json

from tests.conftest import load_script


def test_head_rows_bench_counts_and_times_the_three_arms(tmp_path, data_root) -> None:
    module = load_script("bench/head_rows.py", "bench_head_rows")
    out = tmp_path / "report.json"
    module.main(
        [
            "--setting", "tiny",
            "--data-root", str(data_root),
            "--n-questions", "8",
            "--eval-batch", "4",
            "--train-batch", "4",
            "--chunks", "2",
            "--samples", "3",
            "--repeats", "2",
            "--methods", "lora", "blob", "bayesian-lora",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    counted = {(r["task"], r["phase"]): r for r in report["counted"]}
    assert list(counted) == [("winogrande_s", "evaluate"), ("winogrande_s", "train")]
    for r in counted.values():
        # WinoGrande's option contexts sit inside the suffix and are never read
        assert 0 < r["needed_per_q"] <= r["gathered_per_q"] < r["suffix_per_q"]
        assert abs(r["gathered_over_suffix"] - r["gathered_per_q"] / r["suffix_per_q"]) < 1e-12
    assert counted[("winogrande_s", "evaluate")]["questions"] == 1267  # the whole split
    timed = [(r["phase"], r["method"]) for r in report["timed"]]
    assert timed == [("evaluate", "lora N=0"), ("train", "lora"),
                     ("evaluate", "blob N=3"), ("train", "blob"),
                     ("evaluate", "bayesian-lora N=3"), ("train", "bayesian-lora")]  # fmt: skip
    for r in report["timed"]:
        assert sorted(r["seconds"]) == ["flat", "rows", "suffix"] and r["questions"] == 8
        assert all(v["n"] == 2 for v in r["seconds"].values())
        med = {arm: v["median"] for arm, v in r["seconds"].items()}
        assert r["flat_over_suffix"] == med["flat"] / med["suffix"]
        assert r["flat_over_rows"] == med["flat"] / med["rows"]
        assert r["rows_over_suffix"] == med["rows"] / med["suffix"]
        diffs = r["score_max_abs_diff_from_flat"]
        if r["phase"] == "train":
            assert diffs is None
            continue
        # the same scores in every arm (BLoB, Bayesian-LoRA: one weight sample per sequence,
        # the same draws)
        assert diffs["rows"] < 1e-4 and diffs["suffix"] < 1e-4
