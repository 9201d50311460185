"""The base model of a run: which one, how it is loaded, and whether its frozen prefix is reused.

One section of ``training.TrainConfig`` (``cfg.base``); its fields keep their flat names as
command-line options and config-file keys (``--model``, ``--dtype``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from blob_lora.utils.settings import check_bool, check_choice, check_str

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BaseModelConfig:
    """How the base model is loaded (``models.load_model_and_tokenizer``) and run."""

    KEY_PREFIX: ClassVar[str] = ""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    trust_remote_code: bool = False
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a bad value, naming its option."""
        check_str(self, "model")
        for name in ("load_in_8bit", "load_in_4bit", "trust_remote_code", "prefix_cache"):
            check_bool(self, name)
        check_choice(self, "dtype", DTYPES)
