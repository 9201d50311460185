"""Method names accepted by ``--method``."""

from __future__ import annotations

import importlib.util

from blob_lora.methods.base import Method
from blob_lora.methods.blob import BlobMethod
from blob_lora.methods.ensemble import EnsembleMethod
from blob_lora.methods.laplace_method import LaplaceMethod
from blob_lora.methods.lora import LoraMethod, MapMethod, MCDropoutMethod
from blob_lora.methods.tfb import TfbMethod
from blob_lora.utils.errors import ConfigError

_BUILTIN: tuple[Method, ...] = (
    BlobMethod(),
    LoraMethod(),
    MapMethod(),
    MCDropoutMethod(),
    EnsembleMethod(),
    TfbMethod(),
)
# Laplace-LoRA needs the KFAC posterior package (blob_lora.methods.laplace).
_OPTIONAL: tuple[Method, ...] = (
    (LaplaceMethod(),) if importlib.util.find_spec("blob_lora.methods.laplace") else ()
)

METHODS: dict[str, Method] = {m.name: m for m in (*_BUILTIN, *_OPTIONAL)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]
