"""BLoB: LoRA whose ``A`` is a low-rank Gaussian, trained with a KL term, predicted by sampling."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from blob_lora.methods.base import RunSettings, StepSchedule
from blob_lora.methods.sampled import SampledLoraMethod
from blob_lora.tuners.blob import (
    BlobConfig,
    BlobLayerMixin,
    blob_layers,
    get_blob_model,
    kl_divergence,
    load_blob_model,
    predictive_noise_mode,
    sampling,
)
from blob_lora.tuners.blob import eval_noise as set_eval_noise
from blob_lora.tuners.blob.std_report import std_of_a


def blob_config_from(cfg: RunSettings, **overrides: Any) -> BlobConfig:
    """The run's ``BlobConfig`` (``cfg.blob``) with the run's ``--eval-samples`` when given;
    ``overrides`` replace single settings (tfb's square std on every layer).

    An unset ``--eval-samples`` keeps ``BlobConfig``'s own default, so the default N lives in
    one place.
    """
    if cfg.evaluation.eval_samples is not None:
        overrides = {"eval_samples": cfg.evaluation.eval_samples, **overrides}
    return replace(cfg.blob, **overrides)


class BlobMethod(SampledLoraMethod):
    name = "blob"
    has_kl = True
    reads_sections = frozenset({"kl", "blob"})
    samples_by_default = BlobConfig.eval_samples
    options_attr = "blob_configs"

    def build(self, base: nn.Module, cfg: RunSettings) -> PeftModel:
        return get_blob_model(base, self.lora_config(cfg), blob_config_from(cfg))

    def samples_asked_by(self, cfg: RunSettings) -> int | None:
        return blob_config_from(cfg).eval_samples

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        return load_blob_model(base, adapter_dir)

    def kl(self, model: nn.Module) -> torch.Tensor:
        return kl_divergence(model)

    def training_summary(
        self, model: nn.Module, cfg: RunSettings, schedule: StepSchedule
    ) -> dict[str, object]:
        # where the std of A ended: one value everywhere means the KL set it, not the data
        report = std_of_a(model)
        return {"std_of_A": report} if report else {}

    def weight_sampling(
        self, model: nn.Module, enabled: bool, mode: str | None
    ) -> AbstractContextManager[Any]:
        return sampling(model, enabled, mode)  # off: BLoB-Mean, A = M

    def predictive_noise(self, model: nn.Module) -> str:
        # Independent weight samples, also when several samples of one example share a batch:
        # by default one coherent sample per sequence, the Bayesian predictive E_q[p(y | x, A)];
        # with eval noise "token" the authors' token-wise Flipout (tuners.blob.eval_noise).
        return predictive_noise_mode(model)

    @contextmanager
    def eval_noise(self, model: nn.Module, kind: str | None) -> Iterator[str | None]:
        # sequence (default) or the authors' token-wise Flipout, read by sampling_mode above;
        # named in the metrics only when some layer samples weights
        with set_eval_noise(model, kind):
            yield next((layer.blob_eval_noise for _, layer in _sampling_layers(model)), None)

    def sampling_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        return _sampling_layers(model)


def _sampling_layers(model: nn.Module) -> Iterator[tuple[str, BlobLayerMixin]]:
    """The BLoB layers that sample weights: those with a std. The others (outside
    ``bayesian_layers``) are plain LoRA."""
    for name, layer in blob_layers(model):
        if any(a in layer.lora_A_rho for a in layer.active_adapters):
            yield name, layer
