"""Plain LoRA (maximum likelihood), and the LoRA settings every LoRA-based method shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from blob_lora.methods.base import Method, RunSettings
from blob_lora.methods.io import load_plain_adapter


def decay_is_inert(lr: float, weight_decay: float, dtype: torch.dtype = torch.float32) -> bool:
    """Whether AdamW's decoupled decay at peak ``lr`` leaves every weight of ``dtype`` as it is.

    AdamW multiplies each weight by ``1 - lr * weight_decay``, cast to the weight's dtype. The
    numbers just below 1.0 are ``eps / 2`` apart, so the factor *is* 1.0 when
    ``lr * weight_decay`` is at most ``eps / 4`` (half that spacing; a tie rounds to even, to
    1.0): 2^-25 in float32, checked against torch's own product in the tests. A smaller lr later
    in the schedule only makes it smaller. LoRA adapters train in float32.
    """
    return weight_decay <= 0 or lr * weight_decay <= torch.finfo(dtype).eps / 4


class LoraMethod(Method):
    """PEFT LoRA trained by maximum likelihood, predicted by its one deterministic forward.

    The base of the LoRA-based methods: they change a setting (``map``: the weight decay,
    ``mc-dropout``: the dropout) or the layers PEFT injects (``blob``), and keep the rest.
    """

    name = "lora"

    @property
    def random_predictive(self) -> bool:  # type: ignore[override]
        """Plain LoRA (and MAP) predict by one deterministic forward. A subclass samples when it
        declares samples (a default N, or fresh draws per call, as MC-dropout and SWAG do), so a
        new sampling method needs nothing more to keep the N it is asked for."""
        return self.samples_by_default > 0 or self.iid_samples

    def lora_config(self, cfg: RunSettings) -> LoraConfig:
        """PEFT's ``LoraConfig`` from the run's LoRA section, with this method's dropout."""
        return cfg.lora.peft_config(dropout=self.lora_dropout(cfg))

    def lora_dropout(self, cfg: RunSettings) -> float:
        """The LoRA dropout probability of this run."""
        return cfg.lora.lora_dropout

    def build(self, base: nn.Module, cfg: RunSettings) -> PeftModel:
        return get_peft_model(base, self.lora_config(cfg))

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        return load_plain_adapter(base, adapter_dir)

    def training_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """A weight decay that rounds away (:func:`decay_is_inert`) is no decay."""
        decay = float(settings.get("weight_decay") or 0.0)
        if decay > 0 and decay_is_inert(float(settings["lr"]), decay):
            return {**settings, "weight_decay": 0.0}
        return settings
