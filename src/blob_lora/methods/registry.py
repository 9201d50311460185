"""Method names accepted by ``--method``."""

from __future__ import annotations

from blob_lora.methods.base import Method
from blob_lora.methods.blob import BlobMethod
from blob_lora.methods.lora import LoraMethod, MapMethod, MCDropoutMethod
from blob_lora.utils.errors import ConfigError

METHODS: dict[str, Method] = {
    m.name: m for m in (BlobMethod(), LoraMethod(), MapMethod(), MCDropoutMethod())
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]
