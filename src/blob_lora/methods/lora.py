"""Plain LoRA (maximum likelihood), and the LoRA settings every LoRA-based method shares."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from blob_lora.methods.base import Method, RunSettings
from blob_lora.methods.io import load_plain_adapter

REGEX_CHARS = set("*()|[]\\")


def target_modules_arg(targets: list[str]) -> list[str] | str:
    """PEFT's form: a list of name suffixes, or one regular expression (full match)."""
    if len(targets) == 1 and REGEX_CHARS & set(targets[0]):
        return targets[0]
    return list(targets)


class LoraMethod(Method):
    """PEFT LoRA trained by maximum likelihood, predicted by its one deterministic forward.

    The base of the LoRA-based methods: they change a setting (``map``: the weight decay,
    ``mc-dropout``: the dropout) or the layers PEFT injects (``blob``), and keep the rest.
    """

    name = "lora"

    def lora_config(self, cfg: RunSettings) -> LoraConfig:
        """PEFT's ``LoraConfig`` from the run's ``--lora-*`` and ``--target-modules``."""
        return LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=self.lora_dropout(cfg),
            target_modules=target_modules_arg(cfg.target_modules),
            task_type="CAUSAL_LM",
        )

    def lora_dropout(self, cfg: RunSettings) -> float:
        """The LoRA dropout probability of this run."""
        return cfg.lora_dropout

    def build(self, base: nn.Module, cfg: RunSettings) -> PeftModel:
        return get_peft_model(base, self.lora_config(cfg))

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        return load_plain_adapter(base, adapter_dir)
