"""Per-example prediction rows, so every aggregate number can be audited and recomputed.

Tables hold only means; storing one JSON row per example lets later analysis (other metrics,
error inspection, OOD scores) run without re-evaluating the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from blob_lora.metrics._inputs import validate_labels, validate_probs, validate_sample_probs
from blob_lora.metrics.uncertainty import decompose_uncertainty


def _plain(value: Any) -> Any:
    """Turn tensor / numpy scalars into Python scalars so ``json.dumps`` accepts them."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"ids: each id must be a scalar, got shape {tuple(value.shape)}")
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value


def per_example_records(
    probs: Any,
    labels: Any,
    ids: Sequence[Any] | None = None,
    sample_probs: Any | None = None,
) -> list[dict[str, Any]]:
    """One JSON-serializable dict per example.

    Keys: ``id`` (``ids[i]``, or the row index when ``ids`` is None), ``label`` (int),
    ``probs`` (list of float), ``pred`` (argmax, int), ``confidence`` (top-1 probability),
    ``correct`` (bool); with ``sample_probs`` (S, N, C) also ``total``, ``aleatoric`` and
    ``epistemic`` (nats, see :func:`decompose_uncertainty`).
    """
    p = validate_probs(probs)
    n, c = p.shape
    y = validate_labels(labels, n, c)
    if ids is not None:
        ids = list(ids)
        if len(ids) != n:
            raise ValueError(f"ids: has {len(ids)} entries but probs has {n} rows")
    unc = None
    if sample_probs is not None:
        sp = validate_sample_probs(sample_probs)
        if sp.shape[1:] != p.shape:
            raise ValueError(
                f"sample_probs: shape {tuple(sp.shape)} does not match probs {tuple(p.shape)}"
            )
        unc = {k: v.tolist() for k, v in decompose_uncertainty(sp).items()}

    conf, pred = p.max(dim=1)
    probs_list = p.tolist()
    conf_list = conf.tolist()
    pred_list = pred.tolist()
    y_list = y.tolist()
    rows: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {
            "id": _plain(ids[i]) if ids is not None else i,
            "label": y_list[i],
            "probs": probs_list[i],
            "pred": pred_list[i],
            "confidence": conf_list[i],
            "correct": pred_list[i] == y_list[i],
        }
        if unc is not None:
            for key in ("total", "aleatoric", "epistemic"):
                row[key] = unc[key][i]
        rows.append(row)
    return rows
