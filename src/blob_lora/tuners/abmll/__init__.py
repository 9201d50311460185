"""ABMLL (Zhang, Snell, Griffiths 2025) as a PEFT tuner: ``config`` (settings), ``layer`` (the
LoRA layers with Gaussian updates) and ``model`` (build, sample, KLs, task posteriors, load)."""

from blob_lora.tuners.abmll.config import AbmllConfig
from blob_lora.tuners.abmll.layer import AbmllLayerMixin, AbmllLinear
from blob_lora.tuners.abmll.model import (
    TaskPosterior,
    abmll_layers,
    gaussian_kl,
    get_abmll_model,
    global_posterior,
    hyper_kl,
    load_abmll_model,
    sampling,
    task_kl,
    task_posterior,
)

__all__ = [
    "AbmllConfig",
    "AbmllLayerMixin",
    "AbmllLinear",
    "TaskPosterior",
    "abmll_layers",
    "gaussian_kl",
    "get_abmll_model",
    "global_posterior",
    "hyper_kl",
    "load_abmll_model",
    "sampling",
    "task_kl",
    "task_posterior",
]
