"""MultiSWAG (Wilson & Izmailov, 2020; with LoRA: Onal et al., AABI 2024): an ensemble of
independent SWAG-LoRA posteriors, the predictive averaged over all of their samples.

Training and assembly are the deep ensemble's (``methods.ensemble``): ``--ensemble-size`` M
runs of method ``swag`` into ``RUN/members/<k>/`` with seeds ``1000 * seed + k``, their adapter
folders (the SWA mean and ``swag_posterior.safetensors``) linked into
``RUN/adapter/member-<k>/``. Loading adds each member's posterior to its adapter ``m<k>``.

M is ``--ensemble-size`` (default 3, the deep ensemble's here; the authors' MultiSWAG
evaluation script lists 5 run folders).

Prediction: N draws from each member's posterior (``--eval-samples``, per member; default 15 as
for ``swag``), so the predictive averages M x N samples; N = 0 gives the M SWA means (an
ensemble of SWA models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from blob_lora.methods.base import RunSettings, unwrapped
from blob_lora.methods.ensemble import EnsembleMethod, ensemble_members, member_dirs
from blob_lora.methods.swag.method import (
    POSTERIORS,
    SwagMethod,
    attach_posterior,
    moments_of,
    sample_predictive,
)
from blob_lora.methods.swag.posterior import POSTERIOR_FILE, SwagPosterior


class MultiSwagMethod(EnsembleMethod):
    """M SWAG-LoRA posteriors from independent runs; predictive = mean over all their samples."""

    name = "multiswag"
    reads_sections = frozenset({"swag", "ensemble"})
    member_method = SwagMethod.name
    samples_by_default = SwagMethod.samples_by_default
    mean_column = True  # N = 0: the M SWA means averaged

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        model = super().load(base, adapter_dir)
        device = next(model.parameters()).device
        for name, folder in zip(ensemble_members(model), member_dirs(adapter_dir), strict=True):
            posterior = SwagPosterior.load(folder / POSTERIOR_FILE, device)
            attach_posterior(model, name, posterior)
        return model

    def posterior_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return moments_of(model)

    def owns(self, model: nn.Module) -> bool:
        inner = unwrapped(model)
        return bool(getattr(inner, "ensemble_adapters", None)) and bool(
            getattr(inner, POSTERIORS, None)
        )

    def summarize(
        self, cfg: RunSettings, sub_summaries: list[dict[str, Any]], record: dict[str, Any]
    ) -> dict[str, Any]:
        """The ensemble's summary, each member with what its SWAG run collected."""
        summary = super().summarize(cfg, sub_summaries, record)
        for member, sub in zip(summary["members"], sub_summaries, strict=True):
            member["swag"] = sub.get("swag")
        return summary

    def eval_samples(self, model: nn.Module, requested: int | None) -> int:
        """N per member (the predictive averages M x N samples)."""
        return self.samples_by_default if requested is None else requested

    @torch.no_grad()
    def predict_samples(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        option_ids: torch.Tensor | None,
        n_samples: int,
        fold: int | None = None,
    ) -> torch.Tensor:
        """(M x max(1, N), B, C): each member's N draws (its SWA mean for N = 0), member by
        member."""
        peft = unwrapped(model)
        previous = peft.active_adapter
        probs = []
        try:
            for name in ensemble_members(model):
                peft.set_adapter(name)
                probs.append(sample_predictive(model, name, batch, option_ids, n_samples))
        finally:
            peft.set_adapter(previous)
        return torch.cat(probs)
