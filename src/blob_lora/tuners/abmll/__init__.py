"""ABMLL (Zhang, Snell, Griffiths 2025) as a PEFT tuner: ``config`` (settings), ``layer`` (the
LoRA layers with Gaussian updates), ``model`` (build, sample, KLs, task posteriors, load) and
``meta`` (the amortised adaptation and the meta-objective)."""

from blob_lora.tuners.abmll.config import AbmllConfig
from blob_lora.tuners.abmll.layer import AbmllLayerMixin, AbmllLinear
from blob_lora.tuners.abmll.meta import Task, adapt, meta_loss
from blob_lora.tuners.abmll.model import (
    TaskPosterior,
    abmll_layers,
    gaussian_kl,
    get_abmll_model,
    global_posterior,
    hyper_nll,
    load_abmll_model,
    sampling,
    task_kl,
    task_posterior,
)

__all__ = [
    "AbmllConfig",
    "AbmllLayerMixin",
    "AbmllLinear",
    "Task",
    "TaskPosterior",
    "abmll_layers",
    "adapt",
    "gaussian_kl",
    "get_abmll_model",
    "global_posterior",
    "hyper_nll",
    "load_abmll_model",
    "meta_loss",
    "sampling",
    "task_kl",
    "task_posterior",
]
