"""A run's LoRA settings, and PEFT's ``LoraConfig`` built from them in one place.

One section of ``training.TrainConfig`` (``cfg.lora``); its fields keep their flat names as
command-line options and config-file keys (``--lora-r``, ``--target-modules``, ...). Every
LoRA-based method (and the BLoB and Bayesian-LoRA tuners, whose layers are PEFT LoRA layers)
gets its ``LoraConfig`` from :meth:`LoraSettings.peft_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NoReturn

from peft import LoraConfig

from blob_lora.utils.errors import BlobLoraError, ConfigError
from blob_lora.utils.settings import (
    check_float,
    check_fraction,
    check_int,
    check_str_list,
    refuse,
)

REGEX_CHARS = set("*()|[]\\")


def refuse_adapter(exc: ValueError, what: str, model: str, targets: list[str]) -> NoReturn:
    """Re-raise PEFT's ``ValueError`` from putting ``what`` on ``model`` (no module matches
    ``--target-modules``, an unsupported layer) as a ``ConfigError`` naming the option, so the
    CLI says it in one line instead of a traceback; our own errors pass unchanged."""
    if isinstance(exc, BlobLoraError):
        raise exc
    raise ConfigError(
        f"cannot put {what} on {model}: {exc} (--target-modules {','.join(targets)})"
    ) from exc


def target_modules_arg(targets: list[str]) -> list[str] | str:
    """PEFT's form: a list of name suffixes, or one regular expression (full match)."""
    if len(targets) == 1 and REGEX_CHARS & set(targets[0]):
        return targets[0]
    return list(targets)


@dataclass
class LoraSettings:
    """LoRA's rank, scaling, dropout and the modules it adapts."""

    KEY_PREFIX: ClassVar[str] = ""

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "lm_head"])

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a bad value, naming its option."""
        check_str_list(self, "target_modules")
        check_int(self, "lora_r")
        check_float(self, "lora_alpha")
        check_fraction(self, "lora_dropout")
        if not self.target_modules:
            raise refuse(self, "target_modules", "must name at least one module")

    def unmatched(self, adapted: list[str]) -> list[str]:
        """The name suffixes of ``--target-modules`` that no module of ``adapted`` (the qualified
        names PEFT adapted) ends with; none for a regular expression, which PEFT matches whole.
        Why: PEFT adapts what any suffix matches and drops the rest without a word, so the
        default ``q_proj,v_proj,lm_head`` on a model whose projections are named otherwise
        (GPT-2's ``c_attn``) would adapt ``lm_head`` alone."""
        if isinstance(target_modules_arg(self.target_modules), str):
            return []
        return [
            key
            for key in self.target_modules
            if not any(name == key or name.endswith("." + key) for name in adapted)
        ]

    def peft_config(self, dropout: float | None = None) -> LoraConfig:
        """PEFT's ``LoraConfig`` of these settings; ``dropout`` replaces ``lora_dropout`` (a
        method with its own default, like mc-dropout's)."""
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout if dropout is None else dropout,
            target_modules=target_modules_arg(self.target_modules),
            task_type="CAUSAL_LM",
        )
