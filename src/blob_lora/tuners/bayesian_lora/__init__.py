"""Bayesian-LoRA (Lin et al. 2026) as a PEFT tuner: ``config`` (settings), ``inducing`` (the
inducing-weight posterior of one LoRA factor), ``layer`` (the LoRA layers) and ``model``
(build, sample, KL, save, load)."""

from blob_lora.tuners.bayesian_lora.config import BayesianLoraConfig
from blob_lora.tuners.bayesian_lora.inducing import InducingWeight
from blob_lora.tuners.bayesian_lora.layer import BayesianLoraLayerMixin, BayesianLoraLinear
from blob_lora.tuners.bayesian_lora.model import (
    bayesian_lora_layers,
    get_bayesian_lora_model,
    kl_divergence,
    load_bayesian_lora_model,
    pinned_factors,
    refresh_mean_weights,
    sampling,
)

__all__ = [
    "BayesianLoraConfig",
    "BayesianLoraLayerMixin",
    "BayesianLoraLinear",
    "InducingWeight",
    "bayesian_lora_layers",
    "get_bayesian_lora_model",
    "kl_divergence",
    "load_bayesian_lora_model",
    "pinned_factors",
    "refresh_mean_weights",
    "sampling",
]
