"""Total / aleatoric / epistemic decomposition of predictive uncertainty.

A Bayesian adapter gives S predictive distributions per example, one per weight sample. Their
disagreement is what the method buys over a point estimate, and the standard entropy
decomposition separates it out:

* total     = H[ mean_s p_s ]            (entropy of the averaged predictive)
* aleatoric = mean_s H[ p_s ]            (expected entropy: noise every sample agrees on)
* epistemic = total - aleatoric          (mutual information between label and weights)

All entropies are in nats.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from blob_lora.metrics._inputs import validate_sample_probs


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats along ``dim`` with the convention 0·log 0 = 0.

    Masked answer options carry exact zeros; ``xlogy`` gives 0 for them instead of NaN.
    """
    return -torch.special.xlogy(probs, probs).sum(dim=dim)


def decompose_uncertainty(sample_probs: Any) -> dict[str, Tensor]:
    """Split predictive uncertainty of ``sample_probs`` (S, N, C) into its parts.

    Returns float64 (N,) tensors ``total``, ``aleatoric`` and ``epistemic``. Mutual information
    is non-negative in exact arithmetic (Jensen); rounding can make it about -1e-16, so it is
    clamped at 0 and ``total`` raised to ``aleatoric`` there, so that
    ``total == aleatoric + epistemic`` holds to float64 rounding and no part is negative.
    """
    p = validate_sample_probs(sample_probs)
    total = entropy(p.mean(dim=0))
    aleatoric = entropy(p).mean(dim=0)
    epistemic = (total - aleatoric).clamp_min(0.0)
    total = torch.maximum(total, aleatoric)
    return {"total": total, "aleatoric": aleatoric, "epistemic": epistemic}
