"""Accuracy / ECE / NLL / Brier against values worked out by hand on a fixed matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy

from blob_lora.metrics import calibration_bins, classification_metrics

# 7 examples, 3 options; rows 3, 6 and 7 are 2-option questions (third option masked to 0).
# Top-1 confidences 0.70, 0.62, 0.75, 0.90, 0.42, 0.55, 0.72 fall in 15-bin indices
# 10, 9, 11, 13, 6, 8, 10 (no value sits on a bin edge).
PROBS = [
    [0.70, 0.20, 0.10],
    [0.08, 0.62, 0.30],
    [0.25, 0.75, 0.00],
    [0.90, 0.05, 0.05],
    [0.42, 0.33, 0.25],
    [0.55, 0.45, 0.00],
    [0.72, 0.28, 0.00],
]
LABELS = [0, 2, 1, 0, 1, 1, 1]
CORRECT = [1, 0, 1, 1, 0, 0, 0]


def _probs() -> torch.Tensor:
    return torch.tensor(PROBS, dtype=torch.float64)


def _labels() -> torch.Tensor:
    return torch.tensor(LABELS)


def _ece_by_hand(conf: list[float], correct: list[int], n_bins: int = 15) -> float:
    """Explicit equal-width binning: bin i holds i/n <= conf < (i+1)/n."""
    bins: dict[int, list[int]] = {}
    for i, c in enumerate(conf):
        bins.setdefault(min(int(c * n_bins), n_bins - 1), []).append(i)
    total = 0.0
    for members in bins.values():
        acc = sum(correct[i] for i in members) / len(members)
        avg_conf = sum(conf[i] for i in members) / len(members)
        total += len(members) / len(conf) * abs(acc - avg_conf)
    return total


def test_values_match_hand_computation() -> None:
    m = classification_metrics(_probs(), _labels())
    assert set(m) == {"accuracy", "ece", "nll", "brier", "mean_confidence", "n_examples"}
    assert all(isinstance(v, float) for v in m.values())

    conf = [max(r) for r in PROBS]
    assert m["accuracy"] == pytest.approx(3 / 7, rel=1e-15)
    # Bin 10 holds 0.70 (right) and 0.72 (wrong): |0.5 - 0.71| * 2/7; the rest are singletons.
    expected_ece = (0.21 * 2 + 0.62 + 0.25 + 0.10 + 0.42 + 0.55) / 7
    assert expected_ece == pytest.approx(2.36 / 7)
    assert _ece_by_hand(conf, CORRECT) == pytest.approx(expected_ece)
    assert m["ece"] == pytest.approx(expected_ece, abs=1e-6)

    p_true = [0.70, 0.30, 0.75, 0.90, 0.33, 0.45, 0.28]
    assert m["nll"] == pytest.approx(-sum(math.log(p) for p in p_true) / 7, rel=1e-12)
    # Per-row sum of squared errors: .14, .8808, .125, .015, .6878, .605, 1.0368.
    assert m["brier"] == pytest.approx(3.4904 / 7, rel=1e-12)
    assert m["mean_confidence"] == pytest.approx(4.66 / 7, rel=1e-12)
    assert m["n_examples"] == 7.0


def test_accepts_numpy_and_lists() -> None:
    ref = classification_metrics(_probs(), _labels())
    assert classification_metrics(np.array(PROBS), np.array(LABELS)) == pytest.approx(ref)
    assert classification_metrics(PROBS, LABELS) == pytest.approx(ref, abs=1e-6)


def test_accuracy_is_top1_on_random_predictions() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 5, generator=g), dim=1)
    labels = torch.randint(0, 5, (200,), generator=g)
    m = classification_metrics(probs, labels)
    top1 = (probs.argmax(1) == labels).double().mean().item()
    assert m["accuracy"] == pytest.approx(top1, abs=1e-7)
    assert m["accuracy"] == pytest.approx(
        multiclass_accuracy(probs, labels, num_classes=5, average="micro").item(), abs=1e-7
    )


def test_confident_and_correct_is_perfect() -> None:
    probs = torch.eye(4, dtype=torch.float64)
    m = classification_metrics(probs, torch.arange(4))
    assert m["accuracy"] == 1.0
    assert m["ece"] == pytest.approx(0.0, abs=1e-7)
    assert m["nll"] == pytest.approx(0.0, abs=1e-12)
    assert m["brier"] == 0.0


def test_zero_probability_on_true_label_gives_finite_nll() -> None:
    # True option gets exactly zero mass: NLL is clamped at -log(1e-12), not inf.
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    m = classification_metrics(probs, torch.tensor([1, 0]))
    assert math.isfinite(m["nll"])
    assert m["nll"] == pytest.approx((-math.log(1e-12) + math.log(2)) / 2)
    assert m["brier"] == pytest.approx((2.0 + 0.5) / 2)


def test_probability_slightly_above_one_is_not_treated_as_logits() -> None:
    # torchmetrics would softmax any input outside [0, 1]; the clamp must prevent that.
    probs = torch.tensor([[1.0 + 5e-7, 0.0], [0.0, 1.0]], dtype=torch.float64)
    m = classification_metrics(probs, torch.tensor([0, 1]))
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)
    assert m["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        ([0.5, 0.5], [0], "expected shape"),
        ([[0.5, 0.5]], [[0]], "expected shape"),
        ([[2.0, -1.0]], [0], "negative"),
        ([[0.5, 0.6]], [0], "sum to 1"),
        ([[1.5, 3.0]], [0], "logits"),
        ([[float("nan"), 1.0]], [0], "NaN"),
        ([[0.5, 0.5]], [2], r"\[0, 2\)"),
        ([[0.5, 0.5]], [-1], r"\[0, 2\)"),
        ([[0.5, 0.5]], [0, 1], "has 2 entries"),
        ([[0.5, 0.5]], [0.5], "integer"),
        ([[1.0]], [0], "at least 2 classes"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "no examples"),
    ],
)
def test_invalid_inputs_raise_value_error(probs, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(probs, labels)


def test_calibration_bins_match_fixture() -> None:
    b = calibration_bins(_probs(), _labels())
    assert b["edges"].shape == (16,)
    assert b["count"].sum().item() == 7
    nonzero = torch.nonzero(b["count"]).flatten().tolist()
    assert nonzero == [6, 8, 9, 10, 11, 13]
    assert b["count"][10].item() == 2
    assert b["accuracy"][10].item() == pytest.approx(0.5)
    assert b["confidence"][10].item() == pytest.approx(0.71)
    assert b["accuracy"][13].item() == 1.0
    assert b["count"][0].item() == 0 and b["accuracy"][0].item() == 0.0


def test_calibration_bins_put_confidence_one_in_last_bin() -> None:
    b = calibration_bins(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert b["count"][-1].item() == 1
    assert b["count"].sum().item() == 1


def test_tied_top_probabilities_predict_the_first_option_like_torchmetrics() -> None:
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(2 / 3)
    tm = multiclass_accuracy(probs, labels, num_classes=2, average="micro").item()
    assert m["accuracy"] == pytest.approx(tm, abs=1e-7)
