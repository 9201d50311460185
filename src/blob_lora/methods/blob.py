"""BLoB: LoRA whose ``A`` is a low-rank Gaussian, trained with a KL term, predicted by sampling."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from blob_lora.methods.base import RunSettings, unwrapped
from blob_lora.methods.lora import LoraMethod
from blob_lora.tuners.blob import (
    BlobConfig,
    blob_layers,
    get_blob_model,
    kl_divergence,
    load_blob_model,
    sampling,
)


def blob_config_from(cfg: RunSettings, **overrides: Any) -> BlobConfig:
    """The run's BLoB settings as a ``BlobConfig``; ``overrides`` replace single ones.

    An unset ``--eval-samples`` keeps ``BlobConfig``'s own default, so the default N lives in
    one place.
    """
    settings: dict[str, Any] = {
        "prior_std": cfg.prior_std,
        "init_std": cfg.init_std,
        "std_param": cfg.std_param,
        "flipout": cfg.flipout,
        "bayesian_layers": cfg.bayesian_layers,
    }
    if cfg.eval_samples is not None:
        settings["eval_samples"] = cfg.eval_samples
    return BlobConfig(**{**settings, **overrides})


def blob_configs_of(model: nn.Module) -> dict[str, BlobConfig]:
    """The BLoB settings a BLoB model carries per adapter (``{}`` for any other model)."""
    return getattr(model, "blob_configs", None) or getattr(unwrapped(model), "blob_configs", {})


class BlobMethod(LoraMethod):
    name = "blob"
    has_kl = True
    samples_by_default = BlobConfig.eval_samples
    iid_samples = True

    def build(self, base: nn.Module, cfg: RunSettings) -> PeftModel:
        return get_blob_model(base, self.lora_config(cfg), blob_config_from(cfg))

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        return load_blob_model(base, adapter_dir)

    def owns(self, model: nn.Module) -> bool:
        return bool(blob_configs_of(model))

    def kl(self, model: nn.Module) -> torch.Tensor:
        return kl_divergence(model)

    def eval_samples(self, model: nn.Module, requested: int | None) -> int:
        if requested is not None:
            return requested
        configs = blob_configs_of(model)
        return configs["default"].eval_samples if configs else self.samples_by_default

    @contextmanager
    def sampling_mode(self, model: nn.Module, n_samples: int) -> Iterator[None]:
        # One coherent, independent weight sample per sequence: the Bayesian predictive
        # E_q[p(y | x, A)], also when several samples of one example share a batch.
        with sampling(model, n_samples > 0, mode="independent"):
            yield

    @contextmanager
    def mean_mode(self, model: nn.Module) -> Iterator[None]:
        # BLoB-Mean: A = M. BLoB layers sample by default (training), so the mean pass must
        # switch sampling off explicitly, or N = 0 would be one random sample.
        with sampling(model, False):
            yield

    def stochastic_modules(self, model: nn.Module) -> list[str]:
        # Only layers with a std sample weights; the others (bayesian_layers) are plain LoRA.
        return [
            name
            for name, layer in blob_layers(model)
            if any(a in layer.lora_A_rho for a in layer.active_adapters)
        ]
