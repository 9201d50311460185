"""Building, sampling, saving and loading BLoB models on top of PEFT's ``PeftModel``.

A BLoB model *is* a PEFT model: ``get_blob_model`` registers ``BlobLinear`` as PEFT's custom
module for ``nn.Linear`` and lets PEFT inject it. The only addition to PEFT's save format is
``blob_config.json`` and the ``lora_A_rho`` tensors in the safetensors file; plain PEFT ignores
both and so loads the mean adapter.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PeftModelForCausalLM, PeftModelForSequenceClassification
from peft.utils import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from blob_lora.tuners.blob.config import EVAL_NOISE_MODES, BlobConfig
from blob_lora.tuners.blob.layer import BlobLayerMixin, BlobLinear, quantized_layer_classes
from blob_lora.utils.errors import CheckpointError, ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: The noise mode (``noise.py``) of predictive samples under each ``eval_noise``: samples of one
#: example folded into one batch must be independent, so the magnitudes are drawn per sequence.
PREDICTIVE_NOISE = {"sequence": "independent", "token": "independent-token"}


class BlobPeftMixin:
    """Adds the BLoB settings to ``save_pretrained`` and writes every file atomically."""

    blob_configs: dict[str, BlobConfig]

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write a standard PEFT adapter folder plus ``blob_config.json``, atomically
        (:func:`atomic_save_pretrained`)."""

        def write_config(folder: Path, adapter: str) -> None:
            if adapter in self.blob_configs:
                self.blob_configs[adapter].save(folder)

        atomic_save_pretrained(
            super().save_pretrained, save_directory, kwargs, list(self.peft_config), write_config
        )


def atomic_save_pretrained(
    save: Callable[..., None],
    save_directory: str | os.PathLike[str],
    kwargs: dict[str, Any],
    adapters: list[str],
    write_extra: Callable[[Path, str], None],
) -> None:
    """Run PEFT's ``save`` (a ``save_pretrained``) so that an interrupted save never leaves a
    truncated file behind, and add each adapter's own files with ``write_extra(folder, name)``.

    PEFT writes into a temporary sibling folder first; each file is then renamed into place.
    Shared by the Bayesian tuners, whose folders are PEFT's plus their settings file.
    """
    kwargs.setdefault("safe_serialization", True)
    # The frozen base weights never change under LoRA; PEFT would otherwise copy a targeted
    # lm_head (vocab x hidden) into every adapter folder.
    kwargs.setdefault("save_embedding_layers", False)
    if not kwargs["safe_serialization"]:
        raise ValueError(
            "BLoB and Bayesian-LoRA adapters are saved with safetensors only (no pickle)"
        )
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        save(tmp, **kwargs)
        selected = kwargs.get("selected_adapters") or adapters
        for adapter in selected:
            sub = Path(tmp) if adapter == "default" else Path(tmp) / adapter
            if sub.is_dir():
                write_extra(sub, adapter)
        for src in sorted(Path(tmp).rglob("*")):
            if src.is_file():
                dst = target / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(src, dst)


class BlobPeftModel(BlobPeftMixin, PeftModel):
    """A ``PeftModel`` with BLoB layers (task type unspecified)."""


class BlobPeftModelForCausalLM(BlobPeftMixin, PeftModelForCausalLM):
    """A ``PeftModelForCausalLM`` with BLoB layers."""


class BlobPeftModelForSequenceClassification(BlobPeftMixin, PeftModelForSequenceClassification):
    """A ``PeftModelForSequenceClassification`` with BLoB layers."""


_MODEL_CLASSES: dict[str | None, type[PeftModel]] = {
    "CAUSAL_LM": BlobPeftModelForCausalLM,
    "SEQ_CLS": BlobPeftModelForSequenceClassification,
}


def blob_layers(model: nn.Module) -> Iterator[tuple[str, BlobLayerMixin]]:
    """Every BLoB layer of ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, BlobLayerMixin):
            yield name, module


def _register_blob_modules(lora_config: LoraConfig, blob_config: BlobConfig) -> None:
    # Quantised classes first: bitsandbytes' layers subclass nn.Linear and the first match wins.
    mapping: dict[type, Any] = dict(quantized_layer_classes(blob_config))
    mapping[nn.Linear] = partial(BlobLinear, blob_config=blob_config)
    lora_config._register_custom_module(mapping)


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
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    blob_config = blob_config or BlobConfig()
    blob_config.validate()
    if lora_config.use_dora:
        raise ValueError("BLoB is defined on plain LoRA; use_dora=True is not supported")
    _register_blob_modules(lora_config, blob_config)
    cls = _MODEL_CLASSES.get(
        getattr(lora_config.task_type, "value", lora_config.task_type), BlobPeftModel
    )
    peft_model = cls(model, lora_config, adapter_name=adapter_name, autocast_adapter_dtype=True)
    peft_model.blob_configs = {adapter_name: blob_config}
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
    layers = [layer for _, layer in blob_layers(model)]
    saved = [(layer.blob_sampling, layer.blob_noise_mode_override) for layer in layers]
    try:
        for layer in layers:
            layer.blob_sampling = bool(enabled)
            if mode is not None:
                layer.blob_noise_mode_override = mode
        yield model
    finally:
        for layer, (flag, override) in zip(layers, saved, strict=True):
            layer.blob_sampling = flag
            layer.blob_noise_mode_override = override


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
    layers = [layer for _, layer in blob_layers(model)]
    saved = [layer.blob_eval_noise for layer in layers]
    try:
        if kind is not None:
            for layer in layers:
                layer.blob_eval_noise = kind
        yield model
    finally:
        for layer, old in zip(layers, saved, strict=True):
            layer.blob_eval_noise = old


def std_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The free std parameters (``lora_A_rho``) of every BLoB layer."""
    return [p for _, layer in blob_layers(model) for p in layer.lora_A_rho.values()]


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter folder (``adapter_model.safetensors``), by PEFT key.

    Any adapter folder, BLoB or plain PEFT LoRA: the methods check a loaded adapter against it
    and TFB rotates a LoRA adapter's weights. Refuses a pickled ``adapter_model.bin``, a
    missing file and a corrupt one with ``CheckpointError``.
    """
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{directory} holds a pickled adapter_model.bin; blob-lora loads safetensors only"
            )
        raise CheckpointError(f"{path} not found: not an adapter folder")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or unreadable: {exc}") from exc


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
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"adapter folder {directory} does not exist")
    config_path = directory / ADAPTER_CONFIG
    try:
        lora_config = LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path} is missing or corrupt: {exc}") from exc
    blob_config = BlobConfig.load(directory)
    lora_config.inference_mode = not is_trainable
    state = read_adapter_weights(directory)
    model = get_blob_model(base_model, lora_config, blob_config, adapter_name=adapter_name)
    check_adapter_fits(model, state, directory, adapter_name)
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if not is_trainable:
        model.eval()
    return model


def check_adapter_fits(
    model: PeftModel, state: dict[str, torch.Tensor], directory: Path, adapter_name: str
) -> None:
    """Raise ``CheckpointError`` unless every saved tensor finds its place in ``model`` with the
    same shape and none is missing (another base model, a truncated file)."""
    expected = adapter_state_shapes(model, adapter_name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: saved {tuple(state[k].shape)}, model {tuple(expected[k])}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            details.append(
                "shape mismatch (adapter made for another base model?): "
                + "; ".join(sorted(mismatched)[:5])
            )
        if missing:
            details.append(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"adapter in {directory} does not fit this model: " + " | ".join(details)
        )


def adapter_state_shapes(model: PeftModel, adapter_name: str) -> dict[str, torch.Size]:
    """The shape of every tensor PEFT would save for ``adapter_name`` of ``model``, by the key
    ``read_adapter_weights`` returns: what a saved adapter must hold to fit this model."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    return {k: v.shape for k, v in state.items()}
