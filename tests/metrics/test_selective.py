"""Risk-coverage curve, AURC and accuracy at coverage on small known cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blob_lora.metrics import risk_coverage


def test_known_curve_and_aurc() -> None:
    r = risk_coverage([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1])
    assert r["coverage"].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert r["risk"].tolist() == pytest.approx([0.0, 0.0, 1 / 3, 1 / 4])
    assert r["aurc"] == pytest.approx((1 / 3 + 1 / 4) / 4)
    # ceil(0.8*4) = ceil(0.9*4) = ceil(0.95*4) = 4: all examples, accuracy 3/4.
    assert r["acc_at"] == {0.8: 0.75, 0.9: 0.75, 0.95: 0.75}


def test_accuracy_at_coverage_ten_examples() -> None:
    conf = torch.linspace(1.0, 0.1, 10)
    correct = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
    r = risk_coverage(conf, correct)
    # k = 8, 9, ceil(9.5) = 10 most confident.
    assert r["acc_at"][0.8] == pytest.approx(7 / 8)
    assert r["acc_at"][0.9] == pytest.approx(8 / 9)
    assert r["acc_at"][0.95] == pytest.approx(8 / 10)


def test_input_order_does_not_matter() -> None:
    conf = [0.3, 0.9, 0.6, 0.8, 0.1]
    correct = [0, 1, 1, 0, 1]
    ref = risk_coverage(conf, correct)
    perm = [4, 2, 0, 3, 1]
    r = risk_coverage([conf[i] for i in perm], [correct[i] for i in perm])
    assert torch.equal(r["risk"], ref["risk"])
    assert r["aurc"] == ref["aurc"]


def test_ties_are_resolved_by_expectation() -> None:
    # The two 0.5s share one error: each slot counts half an error, whatever the input order.
    a = risk_coverage([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    b = risk_coverage([0.9, 0.5, 0.5, 0.1], [1, 0, 1, 0])
    assert a["risk"].tolist() == pytest.approx([0.0, 0.25, 1 / 3, 0.5])
    assert torch.equal(a["risk"], b["risk"])
    # All tied: risk is the overall error rate at every coverage.
    c = risk_coverage([0.7] * 4, [1, 0, 0, 1])
    assert c["risk"].tolist() == pytest.approx([0.5] * 4)


def test_all_correct_and_all_wrong() -> None:
    good = risk_coverage(np.array([0.9, 0.5, 0.2]), np.array([True, True, True]))
    assert good["aurc"] == 0.0
    assert set(good["acc_at"].values()) == {1.0}
    bad = risk_coverage([0.9, 0.5, 0.2], [0, 0, 0])
    assert bad["aurc"] == 1.0


def test_coverage_rounding_guard() -> None:
    # 0.55 * 100 = 55.00000000000001 in floating point; the 55 most confident are meant.
    correct = [1] * 55 + [0] * 45
    r = risk_coverage(torch.linspace(1.0, 0.0, 100), correct, coverages=(0.55,))
    assert r["acc_at"] == {0.55: 1.0}


@pytest.mark.parametrize(
    ("conf", "correct", "kwargs", "message"),
    [
        ([0.1, 0.2], [1], {}, "has 1 entries"),
        ([0.1, 0.2], [1, 2], {}, "0/1"),
        ([0.1, float("nan")], [1, 0], {}, "NaN"),
        ([], [], {}, "empty"),
        ([0.1], [1], {"coverages": (0.0,)}, r"\(0, 1\]"),
        ([0.1], [1], {"coverages": (1.5,)}, r"\(0, 1\]"),
    ],
)
def test_invalid_inputs(conf, correct, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        risk_coverage(conf, correct, **kwargs)
