"""Learning curves (issue 19): step 0 is the zero-shot model on exactly the questions the curve
scores, under the run's own scoring; a point on other questions is never drawn."""

from __future__ import annotations

import json
import math
from pathlib import Path

from curves import add_zero_shot, read_curves, scoring_folder


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _experiment(tmp_path: Path, scored_ids: list[str]) -> tuple[Path, Path]:
    run = tmp_path / "exp" / "runs" / "obqa" / "lora" / "seed1"
    run.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"scoring": "cloze", "length_norm": "char"}))
    _jsonl(run / "curve.jsonl", [{"step": 100, "accuracy": 0.5, "nll": 1.0, "ece": 0.1}])
    _jsonl(run / "eval" / "obqa" / "predictions.jsonl", [{"id": i} for i in scored_ids])
    zs = tmp_path / "zs"
    # the zero-shot run scored more questions (and a 3-option one, padded to 4 by the reader);
    # the plain-cloze folder must not be read for a char-normalised run
    _jsonl(
        zs / "runs" / "obqa" / "cloze-char" / "predictions.jsonl",
        [
            {"id": "a", "label": 0, "probs": [0.7, 0.1, 0.1, 0.1]},
            {"id": "b", "label": 1, "probs": [0.6, 0.2, 0.2]},
            {"id": "c", "label": 2, "probs": [0.1, 0.1, 0.8, 0.0]},
            {"id": "x", "label": 0, "probs": [0.0, 1.0, 0.0, 0.0]},
        ],
    )
    _jsonl(zs / "runs" / "obqa" / "cloze" / "predictions.jsonl", [])
    return tmp_path / "exp", zs


def test_scoring_folder_names_zero_shot_variants() -> None:
    assert scoring_folder({"scoring": "letter", "length_norm": "none"}) == "letter"
    assert scoring_folder({"scoring": "cloze", "length_norm": "none"}) == "cloze"
    assert scoring_folder({"scoring": "cloze", "length_norm": "token"}) == "cloze-token"
    assert scoring_folder({"scoring": "cloze"}) == "cloze"


def test_step_zero_scores_the_curve_questions_only(tmp_path: Path) -> None:
    experiment, zs = _experiment(tmp_path, ["a", "b", "c"])
    curves = read_curves(experiment)
    add_zero_shot(curves, experiment, zs)
    first, second = curves["obqa"]["lora/seed1"]
    assert first["step"] == 0 and first["zero_shot"] and second["step"] == 100
    assert first["n_examples"] == 3  # "x" (wrong, confident) is not among the curve's questions
    assert math.isclose(first["accuracy"], 2 / 3)
    nll = -(math.log(0.7) + math.log(0.2) + math.log(0.8)) / 3
    assert math.isclose(first["nll"], nll, rel_tol=1e-5)


def test_no_step_zero_when_a_question_lacks_a_zero_shot_prediction(tmp_path: Path) -> None:
    experiment, zs = _experiment(tmp_path, ["a", "b", "missing"])
    curves = read_curves(experiment)
    add_zero_shot(curves, experiment, zs)
    assert [r["step"] for r in curves["obqa"]["lora/seed1"]] == [100]
