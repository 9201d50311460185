"""Uncertainty you can act on: selective prediction and OOD detection from prediction rows.

Both work on the per-example rows that evaluation writes (``predictions.jsonl``) or that
``blob_lora.prediction.predict`` returns, so they can be recomputed later without the model
(``compare`` calls :func:`ood_detection` on two evaluation folders).

* Selective prediction: answer only the most confident examples. ``aurc`` (area under the
  risk-coverage curve, lower is better) and the accuracy over the 80/90/95 % most confident
  examples (``acc_at_80`` ...), ranked by top-1 probability.
* OOD detection: how well a score separates an OOD set (positive) from the ID set: AUROC and
  AUPR for ``total`` (entropy of the predictive), ``epistemic`` (mutual information; only
  when both sets have it) and ``1-confidence``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blob_lora.metrics import (
    entropy,
    ood_detection_metrics,
    ood_roc_plot,
    risk_coverage,
    risk_coverage_plot,
)
from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import DataError

PREDICTIONS_FILE = "predictions.jsonl"
OOD_FILE = "ood.json"
OOD_ROC_FILE = "ood_roc.png"
RISK_COVERAGE_FILE = "risk_coverage.png"
OOD_SCORES = ("total", "epistemic", "1-confidence")
COVERAGES = {"acc_at_80": 0.8, "acc_at_90": 0.9, "acc_at_95": 0.95}

Rows = Sequence[dict[str, Any]]


def read_predictions(source: str | os.PathLike[str] | Rows) -> list[dict[str, Any]]:
    """Prediction rows from a ``predictions.jsonl`` file, a folder holding one, or rows."""
    if not isinstance(source, str | os.PathLike):
        rows = list(source)
        if not rows:
            raise DataError("no prediction rows given")
        return rows
    path = Path(source)
    if path.is_dir():
        path = path / PREDICTIONS_FILE
    if not path.is_file():
        raise DataError(
            f"{path} not found: expected an evaluation folder or its {PREDICTIONS_FILE}"
        )
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or "probs" not in row:
            raise DataError(f"{path}, line {lineno}: not a prediction row (no 'probs')")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no predictions")
    return rows


def _probs(row: dict[str, Any]) -> Tensor:
    return torch.tensor(row["probs"], dtype=torch.float64)


def uncertainty_scores(rows: Rows) -> dict[str, Tensor]:
    """Per-example scores, higher = less sure: ``total``, ``1-confidence`` and, when every row
    has it, ``epistemic``. ``total`` is recomputed from ``probs`` where a row lacks it."""
    total, conf, epi = [], [], []
    for row in rows:
        p = _probs(row)
        t = row.get("total")
        total.append(float(entropy(p)) if t is None else float(t))
        c = row.get("confidence")
        conf.append(float(p.max()) if c is None else float(c))
        epi.append(row.get("epistemic"))
    scores = {
        "total": torch.tensor(total, dtype=torch.float64),
        "1-confidence": 1.0 - torch.tensor(conf, dtype=torch.float64),
    }
    if all(e is not None for e in epi):
        scores["epistemic"] = torch.tensor(epi, dtype=torch.float64)
    return scores


def selective_metrics(confidence: Any, correct: Any) -> dict[str, float]:
    """``aurc`` and ``acc_at_80/90/95`` of ranking by ``confidence`` (higher = answer first)."""
    rc = risk_coverage(confidence, correct, coverages=tuple(COVERAGES.values()))
    out = {"aurc": rc["aurc"]}
    for key, c in COVERAGES.items():
        out[key] = rc["acc_at"][float(c)]
    return out


def risk_coverage_figure(
    probs: Tensor,
    labels: Tensor,
    path: str | os.PathLike[str],
    epistemic: Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Risk-coverage curves ranking by top-1 probability, by -entropy and (if given) by
    -epistemic, so a reader sees which score abstains best."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    correct = p.argmax(-1) == torch.as_tensor(labels)
    curves: dict[str, tuple[Any, Any]] = {
        "max probability": (p.max(-1).values, correct),
        "-total entropy": (-entropy(p), correct),
    }
    if epistemic is not None:
        curves["-epistemic (MI)"] = (-torch.as_tensor(epistemic, dtype=torch.float64), correct)
    return risk_coverage_plot(curves, path, title=title)


def ood_detection(
    id_source: str | os.PathLike[str] | Rows,
    ood_source: str | os.PathLike[str] | Rows,
    out_dir: str | os.PathLike[str] | None = None,
    title: str | None = None,
    id_name: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """AUROC/AUPR of telling ``ood_source`` (positive) from ``id_source`` by each score.

    Sources are evaluation folders, ``predictions.jsonl`` paths or prediction rows. With
    ``out_dir`` also writes ``ood.json`` and ``ood_roc.png`` there. ``epistemic`` is scored only
    when both sets carry it (a method with samples, N >= 2). ``id_name`` labels the ID set in
    the report (default: its path, when given as one).
    """
    id_rows, ood_rows = read_predictions(id_source), read_predictions(ood_source)
    s_id, s_ood = uncertainty_scores(id_rows), uncertainty_scores(ood_rows)
    names = [n for n in OOD_SCORES if n in s_id and n in s_ood]
    report: dict[str, Any] = {
        "n_id": len(id_rows),
        "n_ood": len(ood_rows),
        "positive": "ood",
        "id_source": str(id_name or id_source)
        if id_name or isinstance(id_source, str | os.PathLike)
        else None,
        "scores": {n: ood_detection_metrics(s_id[n], s_ood[n]) for n in names},
    }
    missing = [n for n in OOD_SCORES if n not in names]
    if missing:
        report["not_scored"] = {n: "needs samples (N >= 2) in both sets" for n in missing}
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / OOD_FILE, report)
        ood_roc_plot({n: (s_id[n], s_ood[n]) for n in names}, out / OOD_ROC_FILE, title=title)
    return report


def flat_ood_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``ood_auroc_<score>`` / ``ood_aupr_<score>`` keys for a metrics table."""
    out = {}
    for name, m in report["scores"].items():
        key = name.replace("1-confidence", "confidence")
        out[f"ood_auroc_{key}"] = m["auroc"]
        out[f"ood_aupr_{key}"] = m["aupr"]
    return out
