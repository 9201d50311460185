"""Smoke test of bench/head_rows.py on its tiny setting: the counted head positions are ordered
as the gather promises (needed <= gathered < whole suffix) and both arms are timed alike."""

from __future__ import annotations

import json

from tests.conftest import load_script


def test_head_rows_bench_counts_and_times_both_arms(tmp_path, data_root) -> None:
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
                     ("evaluate", "blob N=3"), ("train", "blob")]  # fmt: skip
    for r in report["timed"]:
        assert r["whole_s"]["n"] == 2 and r["gathered_s"]["n"] == 2 and r["questions"] == 8
        assert r["ratio"] == r["gathered_s"]["median"] / r["whole_s"]["median"]
