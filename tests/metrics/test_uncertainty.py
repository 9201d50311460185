"""Entropy decomposition: identities and a worked 2-sample example."""

from __future__ import annotations

import math

import pytest
import torch

from blob_lora.metrics import decompose_uncertainty, entropy


def test_two_sample_known_values() -> None:
    # Two weight samples that disagree: [0.9, 0.1] and [0.1, 0.9]; their mean is uniform.
    sp = torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]], dtype=torch.float64)
    d = decompose_uncertainty(sp)
    h_sample = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))  # 0.325083
    assert d["total"].item() == pytest.approx(math.log(2), rel=1e-12)
    assert d["aleatoric"].item() == pytest.approx(h_sample, rel=1e-12)
    assert d["epistemic"].item() == pytest.approx(math.log(2) - h_sample, rel=1e-12)
    assert d["epistemic"].item() == pytest.approx(0.368064, abs=1e-6)


def test_agreeing_samples_have_zero_epistemic() -> None:
    p = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    d = decompose_uncertainty(p.expand(4, 3, 3))
    assert torch.all(d["epistemic"] == 0.0)
    assert torch.allclose(d["total"], d["aleatoric"], atol=1e-15)
    assert d["total"][2].item() == 0.0  # one-hot: no uncertainty, and 0·log0 = 0, not NaN
    assert d["total"][1].item() == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))


def test_confident_disagreement_is_purely_epistemic() -> None:
    sp = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    d = decompose_uncertainty(sp)
    assert d["aleatoric"].item() == 0.0
    assert d["epistemic"].item() == pytest.approx(math.log(2))


def test_identities_on_random_samples() -> None:
    g = torch.Generator().manual_seed(0)
    sp = torch.softmax(3 * torch.randn(8, 50, 4, generator=g, dtype=torch.float64), dim=-1)
    sp[:, :10, 3] = 0.0  # masked fourth option on some questions
    sp = sp / sp.sum(-1, keepdim=True)
    d = decompose_uncertainty(sp)
    for key in ("total", "aleatoric", "epistemic"):
        assert d[key].shape == (50,)
        assert d[key].dtype == torch.float64
        assert torch.all(d[key] >= 0)
        assert torch.isfinite(d[key]).all()
    assert torch.allclose(d["total"], d["aleatoric"] + d["epistemic"], atol=1e-12)
    assert torch.all(d["total"] <= math.log(4) + 1e-12)
    assert torch.all(d["total"][:10] <= math.log(3) + 1e-12)


def test_entropy_of_uniform_is_log_c() -> None:
    assert entropy(torch.full((5,), 0.2, dtype=torch.float64)).item() == pytest.approx(math.log(5))


@pytest.mark.parametrize(
    ("sp", "message"),
    [
        (torch.full((3, 2), 0.5), "expected shape"),
        (torch.full((2, 3, 2), 0.7), "sum to 1"),
        (torch.zeros(0, 3, 2), "empty"),
    ],
)
def test_invalid_inputs(sp, message) -> None:
    with pytest.raises(ValueError, match=message):
        decompose_uncertainty(sp)
