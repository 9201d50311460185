"""A run's LoRA settings, and PEFT's ``LoraConfig`` built from them in one place.

One section of ``training.TrainConfig`` (``cfg.lora``); its fields keep their flat names as
command-line options and config-file keys (``--lora-r``, ``--target-modules``, ...). Every
LoRA-based method (and the BLoB and Bayesian-LoRA tuners, whose layers are PEFT LoRA layers)
gets its ``LoraConfig`` from :meth:`LoraSettings.peft_config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn

from peft import LoraConfig

from blob_lora.utils.errors import BlobLoraError, ConfigError
from blob_lora.utils.settings import (
    check_float,
    check_fraction,
    check_int,
    check_regexes,
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


def _is_regex(target: str) -> bool:
    return bool(REGEX_CHARS & set(target))


def target_modules_arg(targets: list[str]) -> list[str] | str:
    r"""PEFT's form: a list of name suffixes, or one regular expression (full match). A list
    with an expression among other entries becomes one expression, each suffix ``s`` written
    ``(.*\.)?s`` (PEFT's suffix rule): given the list, PEFT would take the expression for a
    suffix, which matches nothing, and adapt the other entries alone."""
    if not any(map(_is_regex, targets)):
        return list(targets)
    if len(targets) == 1:
        return targets[0]
    return "|".join(
        f"(?:{_scoped(t)})" if _is_regex(t) else rf"(?:.*\.)?{re.escape(t)}" for t in targets
    )


_GLOBAL_FLAGS = re.compile(r"^\(\?([aiLmsux]+)\)")


def _scoped(expression: str) -> str:
    """``expression`` with its leading global flags (``(?i)...``) made flags of its own group
    (``(?i:...)``): Python allows global flags only at the start of a whole pattern, which an
    entry joined after others no longer is."""
    match = _GLOBAL_FLAGS.match(expression)
    if match is None:
        return expression
    return f"(?{match.group(1)}:{expression[match.end() :]})"


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
        check_regexes(self, "target_modules", filter(_is_regex, self.target_modules))
        check_int(self, "lora_r")
        check_float(self, "lora_alpha")
        check_fraction(self, "lora_dropout")
        if not self.target_modules:
            raise refuse(self, "target_modules", "must name at least one module")

    def unmatched(self, adapted: list[str]) -> list[str]:
        """The entries of ``--target-modules`` that matched no module of ``adapted`` (the
        qualified names PEFT adapted): a name suffix that none ends with, an expression that
        none matches whole (where the expression is one of several entries; alone, PEFT
        refuses it when it matches nothing). Why: PEFT adapts what any entry matches and drops
        the rest without a word, so the default ``q_proj,v_proj,lm_head`` on a model whose
        projections are named otherwise (GPT-2's ``c_attn``) would adapt ``lm_head`` alone."""

        def hit(key: str, name: str) -> bool:
            if _is_regex(key):
                return re.fullmatch(key, name) is not None
            return name == key or name.endswith("." + key)

        if len(self.target_modules) == 1 and _is_regex(self.target_modules[0]):
            return []
        return [key for key in self.target_modules if not any(hit(key, n) for n in adapted)]

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
