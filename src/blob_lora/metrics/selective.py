"""Selective prediction: how error falls when the model may abstain on its least confident cases.

A well-ranked confidence lets a system answer only the questions it is sure about. The
risk-coverage curve answers the ``k`` most confident examples for every ``k`` and records the
error rate among them; its area (AURC) summarises ranking quality in one number (lower is
better).

Conventions (fixed so that numbers are comparable across runs):

* Coverage ``k/N`` for ``k = 1..N``; risk at ``k`` is the error rate among the top ``k``.
* AURC is the plain mean of the N risks, i.e. a right-endpoint Riemann sum with step ``1/N``
  (no trapezoid, no point at coverage 0).
* Ties in confidence are resolved by expectation: inside a group of equal confidences each
  position counts the group's mean error rate, which equals the average over every ordering
  of the tie. The result therefore does not depend on input order, and at group boundaries it
  equals the exact error count.
* Accuracy at coverage ``c`` is ``1 - risk`` at ``k = ceil(c·N)`` (at least 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from blob_lora.metrics._inputs import validate_correct, validate_scores

DEFAULT_COVERAGES: tuple[float, ...] = (0.8, 0.9, 0.95)


def _coverage_k(c: float, n: int) -> int:
    """Number of examples kept at coverage ``c``; guards against 0.9*10 = 9.000000000000002."""
    return max(1, math.ceil(round(c * n, 9)))


def risk_coverage(
    confidence: Any,
    correct: Any,
    coverages: Sequence[float] = DEFAULT_COVERAGES,
) -> dict[str, Any]:
    """Risk-coverage curve, AURC and accuracy at fixed coverages.

    ``confidence`` (N,) is any score where higher means "more likely correct" (e.g. top-1
    probability); ``correct`` (N,) is boolean or 0/1. Returns ``coverage`` and ``risk`` as
    float64 (N,) tensors ordered by increasing coverage, ``aurc`` (float) and ``acc_at``, a dict
    from each requested coverage to the accuracy over the ``ceil(c·N)`` most confident
    examples. See the module docstring for the tie convention.
    """
    conf = validate_scores(confidence, "confidence")
    n = conf.shape[0]
    ok = validate_correct(correct, n)
    for c in coverages:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"coverages: each value must be in (0, 1], got {c}")

    order = torch.argsort(conf, descending=True, stable=True)
    conf_sorted = conf[order]
    err_sorted = (~ok[order]).to(torch.float64)

    # Spread each tie group's errors evenly over its positions (expected error per slot).
    _, inverse, counts = torch.unique_consecutive(
        conf_sorted, return_inverse=True, return_counts=True
    )
    group_err = torch.zeros(len(counts), dtype=torch.float64).scatter_add_(0, inverse, err_sorted)
    per_slot = (group_err / counts.to(torch.float64))[inverse]

    k = torch.arange(1, n + 1, dtype=torch.float64)
    risk = per_slot.cumsum(0) / k
    coverage = k / n
    acc_at = {float(c): float(1.0 - risk[_coverage_k(c, n) - 1]) for c in coverages}
    return {
        "coverage": coverage,
        "risk": risk,
        "aurc": float(risk.mean()),
        "acc_at": acc_at,
    }
