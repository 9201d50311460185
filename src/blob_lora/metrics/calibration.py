"""Accuracy and calibration metrics of a predictive distribution (method doc, section 5).

The numbers reported in the paper's tables come from here: ACC, ECE, NLL and Brier of the
averaged predictive ``p̄`` over the answer options. ECE follows the paper's implementation
exactly (torchmetrics, top-label, 15 equal-width bins, L1) so our values are comparable; it is
returned as a fraction, and tables multiply by 100.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassCalibrationError

from blob_lora.metrics._inputs import validate_labels, validate_probs

#: Number of equal-width confidence bins for ECE and reliability diagrams (paper setting).
N_BINS = 15

#: Probabilities are clamped from below at this value before taking the log, so a model that
#: puts exactly zero mass on the true option gets a large but finite NLL (-log 1e-12 ≈ 27.6)
#: instead of ``inf`` poisoning the mean over seeds.
NLL_EPS = 1e-12


def classification_metrics(probs: Any, labels: Any) -> dict[str, float]:
    """Accuracy, ECE, NLL, Brier and mean confidence of ``probs`` (N, C) against ``labels`` (N,).

    ``probs`` must be probabilities (rows sum to 1 within 1e-3); exact zeros for masked options
    are fine. Returns plain floats under keys ``accuracy``, ``ece`` (fraction, not %), ``nll``
    (nats), ``brier`` (sum over classes, mean over examples, range [0, 2]),
    ``mean_confidence`` (mean top-1 probability) and ``n_examples``.
    """
    p = validate_probs(probs)
    n, c = p.shape
    y = validate_labels(labels, n, c)
    # torchmetrics treats any value outside [0, 1] as a logit and softmaxes the whole input;
    # clamp so a float-rounding 1.0000001 can never trigger that silently.
    p_tm = p.clamp(0.0, 1.0)

    # sync_on_compute=False: callers pass complete (already gathered) arrays; under
    # torch.distributed torchmetrics would otherwise all-gather them again, and hang when
    # only the main process computes (reliability diagram).
    ece_metric = MulticlassCalibrationError(
        num_classes=c, n_bins=N_BINS, norm="l1", sync_on_compute=False
    )
    ece_metric.update(p_tm, y)
    ece = float(ece_metric.compute())

    # Top-1 accuracy by argmax (first index on ties, as torchmetrics' MulticlassAccuracy with
    # average="micro"), in float64 so 3/7 is reported as 3/7 rather than its float32 rounding.
    conf, pred = p.max(dim=1)
    accuracy = float((pred == y).to(torch.float64).mean())

    p_true = p.gather(1, y[:, None]).squeeze(1)
    nll = float(-torch.log(p_true.clamp_min(NLL_EPS)).mean())
    onehot = torch.nn.functional.one_hot(y, c).to(torch.float64)
    brier = float(((p - onehot) ** 2).sum(dim=1).mean())
    mean_conf = float(conf.mean())

    return {
        "accuracy": accuracy,
        "ece": ece,
        "nll": nll,
        "brier": brier,
        "mean_confidence": mean_conf,
        "n_examples": float(n),
    }


def calibration_bins(probs: Any, labels: Any, n_bins: int = N_BINS) -> dict[str, Tensor]:
    """Per-bin statistics of top-label confidence, for reliability diagrams.

    Bins are ``[i/n_bins, (i+1)/n_bins)``, the last one closed at 1. (torchmetrics gives a
    confidence of exactly 1.0 a bin of its own; merging it into the last bin keeps the plot at
    ``n_bins`` bars, so the gaps drawn can differ from the reported ECE only when some
    confidence is exactly 1.) Returns float64 tensors ``edges`` (n_bins + 1,), ``count``,
    ``accuracy`` and ``confidence`` (n_bins,); empty bins have accuracy and confidence 0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins: must be >= 1, got {n_bins}")
    p = validate_probs(probs)
    n, c = p.shape
    y = validate_labels(labels, n, c)
    conf, pred = p.max(dim=1)
    correct = (pred == y).to(torch.float64)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(conf))
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, correct)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, conf)
    safe = count.clamp_min(1.0)
    return {
        "edges": edges,
        "count": count,
        "accuracy": acc_sum / safe,
        "confidence": conf_sum / safe,
    }
