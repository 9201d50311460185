"""Building, sampling, saving and loading BLoB models on top of PEFT's ``PeftModel``.

A BLoB model *is* a PEFT model: ``get_blob_model`` registers ``BlobLinear`` as PEFT's custom
module for ``nn.Linear`` and lets PEFT inject it. The only addition to PEFT's save format is
``blob_config.json`` and the ``lora_A_rho`` tensors in the safetensors file; plain PEFT ignores
both and so loads the mean adapter.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from peft import LoraConfig, PeftModel
from torch import nn

from blob_lora.tuners.blob.config import EVAL_NOISE_MODES, BlobConfig
from blob_lora.tuners.blob.layer import BlobLayerMixin, BlobLinear, quantized_layer_classes
from blob_lora.tuners.peft_adapter import (
    CustomTuner,
    OptionsPeftMixin,
    custom_layers,
    layer_attributes,
    load_adapter_folder,
)
from blob_lora.utils.errors import ConfigError

#: The noise mode (``noise.py``) of predictive samples under each ``eval_noise``: samples of one
#: example folded into one batch must be independent, so the magnitudes are drawn per sequence.
PREDICTIVE_NOISE = {"sequence": "independent", "token": "independent-token"}


class BlobPeftMixin(OptionsPeftMixin):
    """Adds the BLoB settings (``blob_config.json``) to ``save_pretrained``; atomic."""

    OPTIONS_ATTR = "blob_configs"
    blob_configs: dict[str, BlobConfig]


def blob_layers(model: nn.Module) -> Iterator[tuple[str, BlobLayerMixin]]:
    """Every BLoB layer of ``model`` with its qualified name."""
    return custom_layers(model, BlobLayerMixin)


def _blob_modules(blob_config: BlobConfig) -> dict[type, Any]:
    # Quantised classes first: bitsandbytes' layers subclass nn.Linear and the first match wins.
    mapping: dict[type, Any] = dict(quantized_layer_classes(blob_config))
    mapping[nn.Linear] = partial(BlobLinear, blob_config=blob_config)
    return mapping


_TUNER = CustomTuner(
    "BLoB",
    BlobPeftMixin,
    "Blob",
    layers=_blob_modules,
    task_types=("CAUSAL_LM", "SEQ_CLS"),
    quantised_layers=True,
)


def get_blob_model(
    model: nn.Module,
    lora_config: LoraConfig,
    blob_config: BlobConfig | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` in a PEFT model whose LoRA linear layers are BLoB layers.

    The LoRA settings (rank, alpha, targets, dropout) are PEFT's; ``blob_config`` adds the
    variational ones. Adapters are kept in float32 whatever the base dtype.
    """
    blob_config = blob_config or BlobConfig()
    peft_model = _TUNER.build(model, lora_config, blob_config, adapter_name)
    n_bayesian = 0
    for name, layer in blob_layers(peft_model):
        if blob_config.is_bayesian(name):
            n_bayesian += adapter_name in layer.lora_A_rho
        else:
            layer.make_deterministic(adapter_name)
    if n_bayesian == 0:
        warnings.warn(
            "no LoRA layer is Bayesian: check LoraConfig.target_modules and "
            "BlobConfig.bayesian_layers",
            stacklevel=2,
        )
    return peft_model


@contextmanager
def sampling(model: nn.Module, enabled: bool, mode: str | None = None) -> Iterator[nn.Module]:
    """Turn weight sampling on or off for every BLoB layer inside the block.

    Off gives the mean weights ``A = M`` through PEFT's own LoRA forward. ``mode`` overrides the
    noise mode for the block (e.g. ``"independent"`` when sample copies share a batch).
    """
    values: dict[str, Any] = {"blob_sampling": bool(enabled)}
    if mode is not None:
        values["blob_noise_mode_override"] = mode
    with layer_attributes([layer for _, layer in blob_layers(model)], **values):
        yield model


def predictive_samples(model: nn.Module) -> int:
    """The model's default number of predictive weight samples (``BlobConfig.eval_samples``
    it was built or loaded with; the class default without BLoB layers)."""
    return next(
        (layer.blob_eval_samples for _, layer in blob_layers(model)), BlobConfig.eval_samples
    )


def predictive_noise_mode(model: nn.Module) -> str:
    """The noise mode predictive samples use: ``PREDICTIVE_NOISE`` of the model's eval noise
    (``BlobConfig.eval_noise``, or what ``eval_noise`` set; ``sequence`` without BLoB layers)."""
    kind = next((layer.blob_eval_noise for _, layer in blob_layers(model)), "sequence")
    return PREDICTIVE_NOISE[kind]


@contextmanager
def eval_noise(model: nn.Module, kind: str | None) -> Iterator[nn.Module]:
    """Within the block, predictive samples of every BLoB layer use ``kind`` (``sequence`` or
    ``token``, see ``BlobConfig.eval_noise``); ``None`` keeps the model's own. Training noise
    (``flipout``) is not affected."""
    if kind is not None and kind not in EVAL_NOISE_MODES:
        raise ConfigError(f"eval noise must be one of {EVAL_NOISE_MODES}, got {kind!r}")
    values = {} if kind is None else {"blob_eval_noise": kind}
    with layer_attributes([layer for _, layer in blob_layers(model)], **values):
        yield model


def std_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The free std parameters (``lora_A_rho``) of every BLoB layer."""
    return [p for _, layer in blob_layers(model) for p in layer.lora_A_rho.values()]


def load_blob_model(
    base_model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Restore a saved BLoB adapter (mean, ``B`` and std) onto ``base_model`` exactly.

    Every saved tensor must find its place with the same shape; anything else (another base
    model, a truncated file) raises ``CheckpointError`` instead of loading half an adapter.
    """
    return load_adapter_folder(
        base_model,
        directory,
        BlobConfig,
        get_blob_model,
        adapter_name=adapter_name,
        is_trainable=is_trainable,
    )
