"""SWAG's options (``--swag-*``): when it starts collecting, how often, its rank, learning rate
and sample scale.

One section of ``training.TrainConfig`` (``cfg.swag``), read only by ``swag`` and
``multiswag``; each field ``<name>`` is the option ``--swag-<name>`` and the config-file key
``swag_<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from blob_lora.utils.settings import check_float, check_fraction, check_int


@dataclass
class SwagConfig:
    """SWAG-LoRA's collection and sampling settings (see ``methods/swag/method.py``)."""

    KEY_PREFIX: ClassVar[str] = "swag_"

    start: float = 0.5
    every: int = 0
    rank: int = 5
    lr: float | None = None
    scale: float = 0.5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a bad value, naming its option."""
        check_int(self, "every", allow_zero=True)
        check_int(self, "rank", lo=2)  # one deviation has no low-rank covariance
        check_float(self, "lr", allow_none=True)
        check_float(self, "scale")
        check_fraction(self, "start")
