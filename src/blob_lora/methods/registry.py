"""The methods ``--method`` accepts: one instance per method, found by its name.

Adding a method: its module in ``blob_lora.methods`` and its instance in ``_BUILTIN`` below
(CONTRIBUTING.md, "Adding a method").
"""

from __future__ import annotations

import importlib.util

from torch import nn

from blob_lora.methods.abmll import AbmllMethod
from blob_lora.methods.base import Method
from blob_lora.methods.bayesian_lora import BayesianLoraMethod
from blob_lora.methods.blob import BlobMethod
from blob_lora.methods.ensemble import EnsembleMethod
from blob_lora.methods.laplace_method import LaplaceMethod
from blob_lora.methods.lora import LoraMethod
from blob_lora.methods.map import MapMethod
from blob_lora.methods.mc_dropout import MCDropoutMethod
from blob_lora.methods.multiswag import MultiSwagMethod
from blob_lora.methods.swag import SwagMethod
from blob_lora.methods.tfb import TfbMethod
from blob_lora.utils.errors import ConfigError

_BUILTIN: tuple[Method, ...] = (
    BlobMethod(),
    LoraMethod(),
    MapMethod(),
    MCDropoutMethod(),
    # before ensemble: a MultiSWAG model is also an ensemble model, and owns() is asked in order
    MultiSwagMethod(),
    EnsembleMethod(),
    TfbMethod(),
    BayesianLoraMethod(),
    SwagMethod(),
    # meta-learned (blob-lora meta-train), refused by train; recognises its models for Predictor
    AbmllMethod(),
)
# Laplace-LoRA needs the KFAC posterior package (blob_lora.methods.laplace).
_OPTIONAL: tuple[Method, ...] = (
    (LaplaceMethod(),) if importlib.util.find_spec("blob_lora.methods.laplace") else ()
)

METHODS: dict[str, Method] = {m.name: m for m in (*_BUILTIN, *_OPTIONAL)}
#: what a model no method recognises is predicted as (any PEFT LoRA model)
FALLBACK = "lora"


def get_method(name: str) -> Method:
    """The registered method called ``name`` (``ConfigError`` naming the known ones if none)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def method_of(model: nn.Module) -> Method:
    """The method a loaded model belongs to: the first registered method that ``owns`` it,
    else plain LoRA (``Predictor`` given a model but no method)."""
    for method in METHODS.values():
        if method.owns(model):
            return method
    return METHODS[FALLBACK]
