"""MAP LoRA: LoRA with weight decay, a Gaussian prior's maximum a posteriori estimate."""

from __future__ import annotations

from typing import Any

from torch import nn

from blob_lora.methods.base import RunSettings, StepSchedule
from blob_lora.methods.lora import LoraMethod, decay_is_inert

#: the paper's decay, used when ``--weight-decay`` is left at 0
DEFAULT_WEIGHT_DECAY = 1e-5


class MapMethod(LoraMethod):
    """LoRA with weight decay (paper: 1e-5); trained and predicted as plain LoRA otherwise."""

    name = "map"

    def weight_decay(self, cfg: RunSettings) -> float:
        return cfg.loop.weight_decay if cfg.loop.weight_decay > 0 else DEFAULT_WEIGHT_DECAY

    def training_summary(
        self, model: nn.Module, cfg: RunSettings, schedule: StepSchedule
    ) -> dict[str, object]:
        # run_config.json keeps the setting as given (0: the method's default), so the
        # decay the optimiser used is said here
        return {"weight_decay": self.weight_decay(cfg)}

    def training_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Where its decay rounds away (the paper's 1e-5 at lr up to ~3e-3,
        :func:`decay_is_inert`), a MAP run trains bit for bit as plain LoRA (tested): it is
        one, so Laplace-LoRA's MAP sub-run may be the LoRA run of the same settings."""
        given = float(settings.get("weight_decay") or 0.0)
        decay = given if given > 0 else DEFAULT_WEIGHT_DECAY
        if decay_is_inert(float(settings["lr"]), decay):
            return {**settings, "method": "lora", "weight_decay": 0.0}
        return settings
