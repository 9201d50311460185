"""Checks shared by the settings classes, so every one refuses a bad value with the same words.

A run's settings are grouped by concern (``training.config``: the loop, the data, LoRA, BLoB,
...), each group a small dataclass that checks its own fields. A group validated on its own
(``BlobConfig(prior_std=0)`` in a notebook) names the field as ``BlobConfig.prior_std``; inside
``TrainConfig`` the same problem names the command-line option (``--prior-std``), which is what
a user of the CLI or a config file typed. :class:`SettingError` carries the field and the
problem apart so the owner can name it either way, and each check is written once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from blob_lora.utils.errors import ConfigError


def flag(key: str) -> str:
    """The command-line option of a flat setting key, as error messages name it."""
    return f"--{key.replace('_', '-')}"


class SettingError(ConfigError):
    """A setting's value refused: ``setting`` (a field name) and ``problem`` kept apart so that
    ``TrainConfig`` can re-name the field by its command-line option."""

    def __init__(self, label: str, setting: str, problem: str) -> None:
        super().__init__(f"{label} {problem}")
        self.label = label
        self.setting = setting
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable (the default rebuild passes the message alone): an error of the main
        # process is sent to the others (``training.distributed.on_main``)
        return (type(self), (self.label, self.setting, self.problem))


def label_of(section: Any, name: str) -> str:
    """How ``section`` names its field ``name``: ``Class.name`` for a settings class used on its
    own (``LABEL`` set), else the option ``--<KEY_PREFIX><name>``."""
    owner = getattr(section, "LABEL", None)
    if owner:
        return f"{owner}.{name}"
    return flag(getattr(section, "KEY_PREFIX", "") + name)


def refuse(section: Any, name: str, problem: str) -> SettingError:
    """The error for field ``name`` of ``section`` (raise it)."""
    return SettingError(label_of(section, name), name, problem)


def check_int(
    section: Any,
    name: str,
    *,
    allow_none: bool = False,
    allow_zero: bool = False,
    lo: int | None = None,
) -> None:
    """An integer (not a bool) >= ``lo`` (default 1, or 0 with ``allow_zero``)."""
    v = getattr(section, name)
    if v is None and allow_none:
        return
    lo = lo if lo is not None else 0 if allow_zero else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise refuse(section, name, f"must be an integer >= {lo}, got {v!r}")


def check_float(
    section: Any, name: str, *, allow_none: bool = False, allow_zero: bool = False
) -> None:
    """A finite real number > 0 (>= 0 with ``allow_zero``)."""
    v = getattr(section, name)
    if v is None and allow_none:
        return
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < 0 or (v == 0 and not allow_zero):
        rng = ">= 0" if allow_zero else "> 0"
        raise refuse(section, name, f"must be a finite number {rng}, got {v!r}")


def check_fraction(section: Any, name: str) -> None:
    """A number in [0, 1) (warm-up, dropout, SWAG's start)."""
    v = getattr(section, name)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
        raise refuse(section, name, f"must be a number in [0, 1), got {v!r}")


def check_str(section: Any, name: str, *, optional: bool = False) -> None:
    """A non-empty string, or (``optional``) ``None`` for unset: an empty string is refused
    either way, rather than read as unset by one caller and as a value by another."""
    v = getattr(section, name)
    if optional and v is None:
        return
    if not isinstance(v, str) or not v.strip():
        raise refuse(section, name, f"must be a non-empty string, got {v!r}")


def check_bool(section: Any, name: str) -> None:
    """``True`` or ``False`` (a config file's 1 or "yes" is refused, not guessed)."""
    v = getattr(section, name)
    if not isinstance(v, bool):
        raise refuse(section, name, f"must be true or false, got {v!r}")


def check_str_list(section: Any, name: str, *, optional: bool = False) -> None:
    """A list (or tuple) of non-empty strings, stored back as a list: ``run_config.json`` stores
    lists and resume compares them. ``optional``: ``None`` is allowed too."""
    v = getattr(section, name)
    if v is None and optional:
        return
    if not isinstance(v, list | tuple) or not all(isinstance(x, str) and x.strip() for x in v):
        raise refuse(
            section,
            name,
            f"must be a list of non-empty strings (comma-separated on the command line), got {v!r}",
        )
    setattr(section, name, list(v))


def check_regexes(section: Any, name: str, patterns: Iterable[str]) -> None:
    """Each of ``patterns`` (entries of field ``name``) compiles as a regular expression: one
    that does not is refused by name here, not met later as a traceback from ``re``."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise refuse(
                section, name, f"has an invalid regular expression {pattern!r}: {exc}"
            ) from exc


def check_choice(section: Any, name: str, allowed: Sequence[Any]) -> None:
    """One of ``allowed``."""
    v = getattr(section, name)
    if v not in allowed:
        raise refuse(section, name, f"must be one of {tuple(allowed)}, got {v!r}")
