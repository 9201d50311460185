"""Issue 19's letter-vs-cloze table: seeds averaged per scoring, the binomial standard error,
WinoGrande-M borrowing WinoGrande-S's zero-shot rows, and the distance from chance in s.e."""

from __future__ import annotations

import math

import pytest

from scoring_table import build_rows, render


def _run(task: str, method: str, seed: int, acc: float, n: int) -> dict:
    ev = {task: {"accuracy": acc, "n_examples": float(n)}}
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "status": "done",
        "evaluations": {method: ev},
    }


def _zs(task: str, scoring: str, acc: float, chance: float) -> dict:
    return {
        "task": task,
        "scoring": scoring,
        "chance": chance,
        "majority": 0.6,
        "accuracy": acc,
        "accuracy_se": 0.01,
    }


def test_rows_average_seeds_and_measure_distance_from_chance() -> None:
    letter = {
        "runs": [_run("arc_easy", "lora", 1, 0.26, 400), _run("arc_easy", "blob", 1, 0.9, 400)]
    }
    cloze = {
        "runs": [_run("arc_easy", "lora", s, a, 400) for s, a in ((1, 0.50), (2, 0.54))]
        + [{**_run("arc_easy", "lora", 3, 0.99, 400), "status": "failed"}]
    }
    zero = {
        "rows": [
            _zs("arc_easy", "letter", 0.25, 0.25),
            _zs("arc_easy", "cloze", 0.5, 0.25),
            _zs("winogrande_s", "cloze", 0.55, 0.5),
        ]
    }
    rows = {r["task"]: r for r in build_rows(letter, cloze, zero)}
    arc = rows["arc_easy"]
    assert arc["lora_letter"] == pytest.approx(0.26) and arc["lora_letter_seeds"] == 1
    assert (
        arc["lora_cloze"] == pytest.approx(0.52) and arc["lora_cloze_seeds"] == 2
    )  # failed run left out
    assert arc["lora_cloze_seed_std"] == pytest.approx(math.sqrt(0.02**2 * 2))
    se = math.sqrt(0.52 * 0.48 / 400)
    assert arc["lora_cloze_se"] == pytest.approx(se)
    assert arc["cloze_lora_z_over_chance"] == pytest.approx((0.52 - 0.25) / se)
    assert arc["cloze_lora_z_over_majority"] == pytest.approx((0.52 - 0.60) / se)
    # WG-M is scored on WG-S's validation split: it borrows the zero-shot row
    assert rows["winogrande_m"]["zero_shot_cloze"] == pytest.approx(0.55)
    assert rows["boolq"]["lora_cloze"] is None and rows["boolq"]["cloze_lora_z_over_chance"] is None
    text = render(list(rows.values()))
    assert "| arc_easy | 400 | 25.0 | 60.0 |" in text
    assert "above chance on 1 of 6 tasks, and above the majority-class rate" in text
    assert "label frequencies scores) on 0 of 6 tasks" in text


def test_zero_shot_cloze_cell_is_the_variant_the_runs_use() -> None:
    """Runs scored per token (the spec's default) or per character (a task option) are set
    beside the zero-shot row of the same variant, never the plain sum's."""
    cloze = {
        "spec": {
            "train": {"length_norm": "token"},
            "task_options": {"boolq": {"length_norm": "char"}},
        },
        "runs": [_run("arc_easy", "lora", 1, 0.6, 400), _run("boolq", "lora", 1, 0.7, 400)],
    }
    zero = {
        "rows": [
            _zs(task, variant, acc, 0.25)
            for task in ("arc_easy", "boolq")
            for variant, acc in (("cloze", 0.41), ("cloze-token", 0.42), ("cloze-char", 0.43))
        ]
    }
    rows = {r["task"]: r for r in build_rows({"runs": []}, cloze, zero)}
    assert rows["arc_easy"]["cloze_variant"] == "cloze-token"
    assert rows["arc_easy"]["zero_shot_cloze"] == pytest.approx(0.42)
    assert rows["boolq"]["zero_shot_cloze"] == pytest.approx(0.43)
    # no spec: plain-sum cloze, as the 80-example cloze tables were run
    plain = {r["task"]: r for r in build_rows({"runs": []}, {"runs": cloze["runs"]}, zero)}
    assert plain["arc_easy"]["zero_shot_cloze"] == pytest.approx(0.41)
    assert "42.0 (s.e. 1.0) [token]" in render(list(rows.values()))
