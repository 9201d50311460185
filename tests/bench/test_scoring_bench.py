"""Smoke test of bench/scoring.py on its tiny setting: every variant timed, tokens counted."""

from __future__ import annotations

import json
import math

from tests.conftest import load_script


def _load_bench():
    return load_script("bench/scoring.py", "bench_scoring")


def test_scoring_bench_times_both_scorings(tmp_path, data_root) -> None:
    module = _load_bench()
    out = tmp_path / "report.json"
    module.main(
        [
            "--setting", "tiny",
            "--tasks", "openbookqa", "winogrande_s",
            "--data-root", str(data_root),
            "--batch-size", "2",
            "--warmup", "0",
            "--steps", "1",
            "--samples", "3",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["config"]["setting"] == "tiny"
    assert [r["task"] for r in report["rows"]] == ["openbookqa", "winogrande_s"]
    variants = {f"{m}/{s}" for m in ("lora", "blob") for s in ("letter", "cloze")}
    for r in report["rows"]:
        assert r["eval_samples"] == {"lora": 0, "blob": 3}
        for key in ("train_step_s", "eval_s_per_question"):
            assert set(r[key]) == variants
            for s in r[key].values():
                assert s["n"] == 1 and 0 < s["min"] <= s["median"] <= s["max"]
                assert math.isfinite(s["max"])
        for key in ("train_cloze_over_letter", "eval_cloze_over_letter"):
            for m, ratio in r[key].items():
                stem = "train_step_s" if key.startswith("train") else "eval_s_per_question"
                times = r[stem]
                assert ratio == times[f"{m}/cloze"]["median"] / times[f"{m}/letter"]["median"]
        for s in ("letter", "cloze"):
            assert r["batch_shape"][s][0] == 2
        tok = r["tokens"]
        assert tok["letter_tokens"] > 0 and tok["cloze_packed_tokens"] > 0
        # the packed batch is as wide as its longest packed item
        assert r["batch_shape"]["cloze"][1] >= tok["cloze_packed_tokens"]
        saves = tok["cloze_unpacked_tokens"] - tok["cloze_packed_tokens"]
        assert tok["packing_saves_tokens"] == saves
        # packing saves (options - 1) x the shared prompt, per question
        expected = (tok["options_mean"] - 1) * tok["cloze_shared_tokens"]
        assert math.isclose(saves, expected)
    obqa, wino = report["rows"]
    # OBQA's options share the question: packing runs it once instead of 4 times
    assert obqa["n_options"] == 4 and obqa["tokens"]["options_mean"] == 4
    assert obqa["tokens"]["cloze_shared_tokens"] > 0
    assert obqa["tokens"]["cloze_packed_tokens"] < obqa["tokens"]["cloze_unpacked_tokens"]
    # WinoGrande's partial scoring shares nothing: the packed sequence is the unpacked one
    assert wino["tokens"]["cloze_shared_tokens"] == 0
    assert wino["tokens"]["packing_saves_tokens"] == 0
