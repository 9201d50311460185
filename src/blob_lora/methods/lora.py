"""Plain LoRA (maximum likelihood), and the LoRA settings every LoRA-based method shares."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from blob_lora.methods.base import Method, RunSettings
from blob_lora.methods.io import load_plain_adapter


class LoraMethod(Method):
    """PEFT LoRA trained by maximum likelihood, predicted by its one deterministic forward.

    The base of the LoRA-based methods: they change a setting (``map``: the weight decay,
    ``mc-dropout``: the dropout) or the layers PEFT injects (``blob``), and keep the rest.
    """

    name = "lora"

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
