"""Input conversion and validation shared by the metric functions.

Metrics are the last step before numbers land in a results table, so a silently wrong input
(a transposed matrix, logits instead of probabilities, 1-based labels) must fail loudly here
rather than produce a plausible-looking ECE. Every check raises ``ValueError`` naming the
argument and what is wrong with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

#: Rows of a probability matrix must sum to 1 within this tolerance. Loose enough for bf16
#: softmax outputs that were cast to float32, tight enough to reject logits.
ROW_SUM_TOL = 1e-3


def as_tensor(x: Any, name: str, dtype: torch.dtype | None = None) -> Tensor:
    """Convert a tensor, numpy array or (nested) list to a CPU tensor, detached.

    Metrics run after evaluation, on CPU; detaching and moving here means callers can pass
    whatever the model produced without thinking about devices or autograd.
    """
    if isinstance(x, Tensor):
        t = x.detach().cpu()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"{name}: cannot convert {type(x).__name__} to a tensor: {exc}"
            ) from exc
    if dtype is not None:
        t = t.to(dtype)
    return t


def _check_prob_rows(p: Tensor, name: str) -> None:
    if not torch.isfinite(p).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    if (p < 0).any():
        raise ValueError(f"{name}: contains negative values (min {p.min().item():.4g})")
    sums = p.sum(dim=-1)
    worst = (sums - 1.0).abs().max().item()
    if worst > ROW_SUM_TOL:
        raise ValueError(
            f"{name}: rows must sum to 1 within {ROW_SUM_TOL} (worst row is off by {worst:.4g}); "
            "pass probabilities, not logits"
        )


def validate_probs(probs: Any, name: str = "probs") -> Tensor:
    """Return ``probs`` as a float64 (N, C) tensor after checking it is a probability matrix.

    Exact zeros are allowed: questions with fewer options than ``C`` carry zero mass on the
    masked options.
    """
    p = as_tensor(probs, name).to(torch.float64)
    if p.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, C), got {tuple(p.shape)}")
    n, c = p.shape
    if n == 0:
        raise ValueError(f"{name}: no examples (N = 0)")
    if c < 2:
        raise ValueError(f"{name}: need at least 2 classes, got C = {c}")
    _check_prob_rows(p, name)
    return p


def validate_sample_probs(sample_probs: Any, name: str = "sample_probs") -> Tensor:
    """Return ``sample_probs`` as a float64 (S, N, C) tensor of per-sample predictives."""
    p = as_tensor(sample_probs, name).to(torch.float64)
    if p.ndim != 3:
        raise ValueError(f"{name}: expected shape (S, N, C), got {tuple(p.shape)}")
    s, n, c = p.shape
    if s == 0 or n == 0:
        raise ValueError(f"{name}: empty sample or example dimension, shape {tuple(p.shape)}")
    if c < 2:
        raise ValueError(f"{name}: need at least 2 classes, got C = {c}")
    _check_prob_rows(p, name)
    return p


def validate_labels(labels: Any, n: int, c: int, name: str = "labels") -> Tensor:
    """Return ``labels`` as an int64 (N,) tensor with every value in ``[0, c)``."""
    y = as_tensor(labels, name)
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError(f"{name}: must be integer class indices, got non-integer floats")
    elif y.dtype == torch.bool:
        raise ValueError(f"{name}: must be integer class indices, got booleans")
    y = y.to(torch.int64)
    if y.ndim != 1:
        raise ValueError(f"{name}: expected shape (N,), got {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"{name}: has {y.shape[0]} entries but probs has {n} rows")
    if n and (y.min() < 0 or y.max() >= c):
        raise ValueError(
            f"{name}: values must lie in [0, {c}), got min {y.min().item()} max {y.max().item()}"
        )
    return y


def validate_scores(scores: Any, name: str) -> Tensor:
    """Return a non-empty, finite, 1-D float64 score vector."""
    s = as_tensor(scores, name).to(torch.float64)
    if s.ndim != 1:
        raise ValueError(f"{name}: expected shape (N,), got {tuple(s.shape)}")
    if s.shape[0] == 0:
        raise ValueError(f"{name}: is empty")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return s


def validate_correct(correct: Any, n: int, name: str = "correct") -> Tensor:
    """Return a boolean (N,) tensor; accepts bools or 0/1 numbers."""
    t = as_tensor(correct, name)
    if t.ndim != 1:
        raise ValueError(f"{name}: expected shape (N,), got {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name}: has {t.shape[0]} entries but confidence has {n}")
    if t.dtype != torch.bool:
        if not ((t == 0) | (t == 1)).all():
            raise ValueError(f"{name}: must be boolean or 0/1 values")
        t = t != 0
    return t
