"""A damaged Laplace state is refused on load with a ``CheckpointError`` naming the field,
instead of an einsum, eigh or index error deep in the predictive, or (a negative prior
precision) metrics computed from it without a word."""

from __future__ import annotations

import pytest
import torch

from blob_lora.utils.errors import CheckpointError
from tests.methods.laplace.test_g_residual import HEAD
from tests.methods.laplace.test_g_sketch import _cloze_setup

LAYER = f"layers.{HEAD}"


def _a_vecs_short(sd):
    sd[f"{LAYER}.A_vecs"] = sd[f"{LAYER}.A_vecs"][:, :-1]


def _support_out_of_range(sd):
    sd[f"{LAYER}.G_support"] = sd[f"{LAYER}.G_support"].clone()
    sd[f"{LAYER}.G_support"][0] = 1_000_000


def _nan_in_a(sd):
    sd[f"{LAYER}.A_vals"] = sd[f"{LAYER}.A_vals"].clone()
    sd[f"{LAYER}.A_vals"][0] = float("nan")


def _inf_in_g_vecs(sd):
    sd[f"{LAYER}.G_vecs"] = sd[f"{LAYER}.G_vecs"].clone()
    sd[f"{LAYER}.G_vecs"][0, 0] = float("inf")


def _g_vecs_other_rank(sd):
    sd[f"{LAYER}.G_vecs"] = sd[f"{LAYER}.G_vecs"][:, :-1]


def _negative_prior(sd):
    sd["meta.prior_precision"] = torch.tensor(-1.0, dtype=torch.float64)


def _zero_temperature(sd):
    sd["meta.temperature"] = torch.tensor(0.0, dtype=torch.float64)


@pytest.mark.parametrize(
    "damage, said",
    [
        (_a_vecs_short, r"A_vecs has shape"),
        (_support_out_of_range, r"G_support must index the layer's \d+ outputs"),
        (_nan_in_a, r"A_vals holds a NaN or an infinity"),
        (_inf_in_g_vecs, r"G_vecs holds a NaN or an infinity"),
        (_g_vecs_other_rank, r"G_vecs has shape"),
        (_negative_prior, r"prior_precision must be > 0, got -1.0"),
        (_zero_temperature, r"temperature must be > 0, got 0.0"),
    ],
)
def test_a_damaged_state_is_refused_naming_the_field(damage, said) -> None:
    _, batch, fit = _cloze_setup()
    la = fit(g_dense_limit=40, g_rank=4)
    sd = dict(la.state_dict())
    restored = fit(g_dense_limit=40, g_rank=4)
    restored.load_state_dict(dict(sd))  # the intact state loads
    kept = (restored.prior_precision, restored.temperature, dict(restored.layers))
    damage(sd)
    with pytest.raises(CheckpointError, match=said):
        restored.load_state_dict(sd)
    # a refused state leaves the fit the object held
    assert (restored.prior_precision, restored.temperature, dict(restored.layers)) == kept
