"""Smoke test of bench/gradient_checkpointing.py on its tiny setting: four arms trained by the
real loop, checkpointing on in exactly the two arms that ask for it, ratios from the medians."""

from __future__ import annotations

import json

from tests.conftest import load_script


def test_gradient_checkpointing_bench_measures_four_arms(tmp_path, data_root) -> None:
    module = load_script("bench/gradient_checkpointing.py", "bench_gradient_checkpointing")
    out = tmp_path / "report.json"
    module.main(
        ["--setting", "tiny", "--data-root", str(data_root), "--n-train", "8",
         "--batch-size", "4", "--steps", "2", "--out", str(out)]
    )  # fmt: skip
    report = json.loads(out.read_text())
    arms = ["lora plain", "lora checkpointed", "blob plain", "blob checkpointed"]
    assert [k for k in report if k in arms] == arms
    for arm in arms:
        row = report[arm]
        assert len(row["raw_s"]) == len(row["raw_mib"]) == 2
        assert row["step_s"]["median"] > 0
        # the tiny Llama's 2 decoder blocks
        assert row["blocks_checkpointed"] == (2 if arm.endswith("checkpointed") else 0)
