"""OOD AUROC / AUPR on hand-made scores (OOD is the positive class)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blob_lora.metrics import ood_detection_metrics, ood_roc_curve


def test_perfect_separation() -> None:
    m = ood_detection_metrics([0.1, 0.2, 0.3], [0.5, 0.9])
    assert m == {"auroc": pytest.approx(1.0), "aupr": pytest.approx(1.0)}


def test_reversed_separation() -> None:
    m = ood_detection_metrics([0.8, 0.9], [0.1, 0.2])
    assert m["auroc"] == pytest.approx(0.0)
    # Ranked: id, id, ood, ood -> precision 1/3 and 2/4 at the two positives.
    assert m["aupr"] == pytest.approx((1 / 3 + 2 / 4) / 2, abs=1e-6)


def test_small_case_by_hand() -> None:
    # Ranked high to low: 0.8 ood, 0.4 id, 0.35 ood, 0.1 id.
    # AUROC: 3 of 4 (ood, id) pairs ordered correctly. AP: precision 1 and 2/3 at the positives.
    m = ood_detection_metrics(torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8]))
    assert m["auroc"] == pytest.approx(0.75, abs=1e-6)
    assert m["aupr"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)


def test_ties_count_half() -> None:
    # Pairs (ood, id): (0.5, 0.5) tie -> 1/2, the other three correct -> 3.5 / 4.
    # AP over thresholds 0.9 (P=1, R=1/2) and 0.5 (P=2/3, R=1): 1/2*1 + 1/2*2/3.
    m = ood_detection_metrics([0.5, 0.2], [0.5, 0.9])
    assert m["auroc"] == pytest.approx(0.875, abs=1e-6)
    assert m["aupr"] == pytest.approx(0.5 + 1 / 3, abs=1e-6)


def test_scores_outside_unit_interval_keep_their_order() -> None:
    # A sigmoid would squash 20, 21, 30, 40 to the same float32 1.0 and report 0.5.
    assert ood_detection_metrics([20.0, 21.0], [30.0, 40.0])["auroc"] == pytest.approx(1.0)
    assert ood_detection_metrics([-0.9, -0.8], [-0.5, -0.3])["auroc"] == pytest.approx(1.0)
    m = ood_detection_metrics(np.array([1.0, 4.0]), np.array([3.5, 8.0]))
    assert m["auroc"] == pytest.approx(0.75, abs=1e-6)


def test_roc_curve_endpoints() -> None:
    fpr, tpr = ood_roc_curve([0.1, 0.4], [0.35, 0.8])
    assert fpr[0].item() == 0.0 and tpr[0].item() == 0.0
    assert fpr[-1].item() == 1.0 and tpr[-1].item() == 1.0
    assert torch.all(fpr.diff() >= 0) and torch.all(tpr.diff() >= 0)


@pytest.mark.parametrize(
    ("id_scores", "ood_scores", "message"),
    [
        ([], [0.1], "id_scores: is empty"),
        ([0.1], [], "ood_scores: is empty"),
        ([0.1, float("nan")], [0.2], "NaN"),
        ([[0.1]], [0.2], "expected shape"),
    ],
)
def test_invalid_inputs(id_scores, ood_scores, message) -> None:
    with pytest.raises(ValueError, match=message):
        ood_detection_metrics(id_scores, ood_scores)
