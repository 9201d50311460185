"""YAML read as a user writes numbers: ``lr: 1e-4`` is the float 0.0001.

Why: PyYAML follows YAML 1.1, whose float needs a dot (``1.0e-4``), so ``1e-4`` arrives as the
string "1e-4" and an option that wants a number refuses it. YAML 1.2 (and every other config
format we read: JSON, TOML's ``1e-4``) reads it as a number; this loader adds that one rule to
PyYAML's safe loader and changes nothing else.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """The safe loader, with YAML 1.2's floats without a dot (``1e-4``, ``-2E+3``)."""


# after the built-in int and float resolvers, so "10" is still an int and "1.5" read as before
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, reading ``1e-4`` as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
