"""MAP LoRA: LoRA with weight decay, a Gaussian prior's maximum a posteriori estimate."""

from __future__ import annotations

from blob_lora.methods.base import RunSettings
from blob_lora.methods.lora import LoraMethod

#: the paper's decay, used when ``--weight-decay`` is left at 0
DEFAULT_WEIGHT_DECAY = 1e-5


class MapMethod(LoraMethod):
    """LoRA with weight decay (paper: 1e-5); trained and predicted as plain LoRA otherwise."""

    name = "map"

    def weight_decay(self, cfg: RunSettings) -> float:
        return cfg.loop.weight_decay if cfg.loop.weight_decay > 0 else DEFAULT_WEIGHT_DECAY
