"""Smoke test of bench/train_full_step.py on its tiny setting: the trainer's own loop is driven
for both methods and shapes, and the report's ratios are the ratios of its medians."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script


def test_train_full_step_bench_times_both_shapes(tmp_path, data_root) -> None:
    module = load_script("bench/train_full_step.py", "bench_train_full_step")
    out = tmp_path / "report.json"
    module.main(
        [
            "--setting", "tiny",
            "--data-root", str(data_root),
            "--n-train", "8",
            "--batch-size", "4",
            "--warmup", "1",
            "--steps", "2",
            "--profile",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["config"]["setting"] == "tiny" and report["config"]["task"] == "arc_easy"
    demo, paper = report["rows"]
    assert (demo["shape"], paper["shape"]) == ("demo", "paper")
    # the demo shape adapts the top block of two: the block below is served from the cache
    assert demo["prefix_cached_blocks"] == {"lora": 1, "blob": 1}
    assert paper["prefix_cached_blocks"] == {"lora": 0, "blob": 0}
    assert paper["target_modules"] == ["q_proj", "v_proj", "lm_head"]
    for row in report["rows"]:
        # warm-up + timed steps were taken by the real loop (+1 profiled), each logged
        assert row["steps_taken"] == {"lora": 4, "blob": 4}
        assert row["logged_steps"] == {"lora": [1, 2, 3, 4], "blob": [1, 2, 3, 4]}
        assert row["kl_logged"] == {"lora": False, "blob": True}
        for key in ("step_s", "cpu_s"):
            for s in row[key].values():
                assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"]
        ratio = row["step_s"]["blob"]["median"] / row["step_s"]["lora"]["median"]
        assert row["blob_over_lora"] == pytest.approx(ratio)
        cpu = row["cpu_s"]["blob"]["median"] / row["cpu_s"]["lora"]["median"]
        assert row["blob_over_lora_cpu"] == pytest.approx(cpu)
        # the trainer's profiler labels: every section ran; BLoB's noise path only in BLoB
        sections = row["profile_sections_ms"]
        for method in ("lora", "blob"):
            for key in ("train.forward", "train.backward", "train.update", "train.log"):
                assert sections[method][key] > 0
        assert sections["blob"]["train.update.kl"] > 0 and "train.update.kl" not in sections["lora"]
        assert sections["blob"]["_TokenFlipout"] > 0 and "_TokenFlipout" not in sections["lora"]
    profile = out.with_suffix(".profile.txt").read_text()
    assert "== demo/blob" in profile and "== paper/lora" in profile
