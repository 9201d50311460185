"""The deterministic and dropout baselines: ``lora`` (MLE), ``map``, ``mc-dropout``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from blob_lora.methods.base import Method


class LoraMethod(Method):
    """Plain PEFT LoRA trained by maximum likelihood."""

    name = "lora"


class MapMethod(Method):
    """LoRA with weight decay (a Gaussian prior's MAP estimate); paper: 1e-5."""

    name = "map"

    def weight_decay(self, cfg: Any) -> float:
        return cfg.weight_decay if cfg.weight_decay > 0 else 1e-5


class MCDropoutMethod(Method):
    """LoRA dropout kept active at prediction, averaging N samples (paper: p=0.1, N=10)."""

    name = "mc-dropout"
    samples_by_default = 10

    def lora_dropout(self, cfg: Any) -> float:
        return cfg.lora_dropout if cfg.lora_dropout > 0 else 0.1

    @contextmanager
    def sampling_mode(self, model: nn.Module, n_samples: int) -> Iterator[None]:
        dropouts = [
            m
            for n, m in model.named_modules()
            if ".lora_dropout." in n and isinstance(m, nn.Dropout)
        ]
        if not dropouts:
            raise RuntimeError("mc-dropout model has no LoRA dropout layers")
        for m in dropouts:
            m.train()
        try:
            yield
        finally:
            for m in dropouts:
                m.eval()
