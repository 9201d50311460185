"""BLoB in the shared harness."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from blob_lora.methods.base import Method
from blob_lora.tuners.blob import (
    BlobConfig,
    blob_layers,
    get_blob_model,
    kl_divergence,
    load_blob_model,
    predictive_noise_mode,
    sampling,
)


def blob_config_from(cfg: Any) -> BlobConfig:
    return BlobConfig(
        prior_std=cfg.prior_std,
        init_std=cfg.init_std,
        std_param=cfg.std_param,
        flipout=cfg.flipout,
        eval_samples=cfg.eval_samples if cfg.eval_samples is not None else 10,
        eval_noise=cfg.eval_noise,
        bayesian_layers=cfg.bayesian_layers,
    )


class BlobMethod(Method):
    name = "blob"
    has_kl = True
    samples_by_default = 10
    iid_samples = True

    def build(self, base: nn.Module, cfg: Any) -> PeftModel:
        return get_blob_model(base, self.lora_config(cfg), blob_config_from(cfg))

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        return load_blob_model(base, adapter_dir)

    def kl(self, model: nn.Module) -> torch.Tensor:
        return kl_divergence(model)

    def eval_samples(self, model: nn.Module, requested: int | None) -> int:
        if requested is not None:
            return requested
        configs = getattr(model, "blob_configs", None) or getattr(
            getattr(model, "module", None), "blob_configs", {}
        )
        return configs["default"].eval_samples if configs else self.samples_by_default

    @contextmanager
    def sampling_mode(self, model: nn.Module, n_samples: int) -> Iterator[None]:
        # Independent weight samples, also when several samples of one example share a batch:
        # by default one coherent sample per sequence, the Bayesian predictive E_q[p(y | x, A)];
        # with eval noise "token" the authors' token-wise Flipout (tuners.blob.eval_noise).
        with sampling(model, n_samples > 0, mode=predictive_noise_mode(model)):
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
