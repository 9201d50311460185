"""MC dropout: LoRA dropout kept active at prediction, the predictive an average of N passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from blob_lora.methods.base import RunSettings, StepSchedule
from blob_lora.methods.lora import LoraMethod

#: the paper's dropout, used when ``--lora-dropout`` is left at 0
DEFAULT_DROPOUT = 0.1


def lora_dropout_layers(model: nn.Module) -> list[str]:
    """LoRA layers with a real dropout (``lora_dropout.<adapter>`` is an ``nn.Dropout``)."""
    out = []
    for name, module in model.named_modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict) and any(
            isinstance(d, nn.Dropout) and d.p > 0 for d in drop.values()
        ):
            out.append(name)
    return out


class MCDropoutMethod(LoraMethod):
    """LoRA dropout kept active at prediction, averaging N samples (paper: p=0.1, N=10)."""

    name = "mc-dropout"
    samples_by_default = 10
    mean_column = True  # N = 0: dropout off, the deterministic LoRA it trained
    # each pass draws new dropout masks: samples are fresh and independent
    iid_samples = True

    def lora_dropout(self, cfg: RunSettings) -> float:
        return cfg.lora.lora_dropout if cfg.lora.lora_dropout > 0 else DEFAULT_DROPOUT

    def training_summary(
        self, model: nn.Module, cfg: RunSettings, schedule: StepSchedule
    ) -> dict[str, object]:
        # run_config.json keeps the setting as given (0: the method's default)
        return {"lora_dropout": self.lora_dropout(cfg)}

    def stochastic_modules(self, model: nn.Module) -> list[str]:
        return lora_dropout_layers(model)

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
