"""Out-of-distribution detection from an uncertainty score.

The OOD protocol (train on OBQA, test on ARC/MMLU) asks whether a score such as predictive
entropy or mutual information ranks OOD questions above in-distribution ones. OOD is the
positive class and a higher score means "more likely OOD".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_roc,
)

from blob_lora.metrics._inputs import validate_scores


def _ranked(id_scores: Any, ood_scores: Any) -> tuple[Tensor, Tensor]:
    """Concatenate the scores, mapped to [0, 1] by dense rank, and the OOD targets.

    torchmetrics' binary metrics apply a sigmoid to any input outside [0, 1]. Entropies exceed 1
    and large scores would saturate to identical float32 values, creating false ties. A dense
    rank transform keeps the exact order and ties and lands in [0, 1], so AUROC/AP are those of
    the raw scores.
    """
    s_id = validate_scores(id_scores, "id_scores")
    s_ood = validate_scores(ood_scores, "ood_scores")
    scores = torch.cat([s_id, s_ood])
    _, rank = torch.unique(scores, sorted=True, return_inverse=True)
    top = rank.max().clamp_min(1).to(torch.float64)
    preds = rank.to(torch.float64) / top
    target = torch.cat(
        [torch.zeros(len(s_id), dtype=torch.long), torch.ones(len(s_ood), dtype=torch.long)]
    )
    return preds, target


def ood_detection_metrics(id_scores: Any, ood_scores: Any) -> dict[str, float]:
    """AUROC and AUPR (average precision) of separating OOD (positive) from ID examples.

    ``id_scores`` and ``ood_scores`` are 1-D; higher means more likely OOD. AUROC counts ties
    between an ID and an OOD score as one half; AUPR is step-wise average precision with OOD
    as the positive class, so its chance level is the OOD fraction, not 0.5.
    """
    preds, target = _ranked(id_scores, ood_scores)
    return {
        "auroc": float(binary_auroc(preds, target)),
        "aupr": float(binary_average_precision(preds, target)),
    }


def ood_roc_curve(id_scores: Any, ood_scores: Any) -> tuple[Tensor, Tensor]:
    """False- and true-positive rates of the ROC curve (OOD positive), for plotting."""
    preds, target = _ranked(id_scores, ood_scores)
    fpr, tpr, _ = binary_roc(preds, target)
    return fpr, tpr
