"""Building, sampling, saving and loading Bayesian-LoRA models on top of PEFT's ``PeftModel``.

A Bayesian-LoRA model *is* a PEFT model: ``get_bayesian_lora_model`` registers
``BayesianLoraLinear`` as PEFT's custom module for ``nn.Linear``. A saved folder is PEFT's
(``lora_A`` / ``lora_B`` hold the posterior means, so plain PEFT loads the mean adapter) plus
the ``lora_inducing_*`` tensors in the same safetensors file and ``bayesian_lora_config.json``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from blob_lora.tuners.bayesian_lora.config import BayesianLoraConfig
from blob_lora.tuners.bayesian_lora.inducing import pinned
from blob_lora.tuners.bayesian_lora.layer import (
    SAMPLE_MODES,
    BayesianLoraLayerMixin,
    BayesianLoraLinear,
)
from blob_lora.tuners.peft_adapter import (
    CustomTuner,
    OptionsPeftMixin,
    custom_layers,
    layer_attributes,
    load_adapter_folder,
)
from blob_lora.utils.errors import ConfigError


class BayesianLoraPeftMixin(OptionsPeftMixin):
    """Adds the Bayesian-LoRA settings and the mean copies to ``save_pretrained``; atomic."""

    OPTIONS_ATTR = "bayesian_lora_configs"
    bayesian_lora_configs: dict[str, BayesianLoraConfig]

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write a standard PEFT adapter folder (its ``lora_A`` / ``lora_B`` the posterior
        means) plus ``bayesian_lora_config.json``; every file is renamed into place."""
        refresh_mean_weights(self)  # type: ignore[arg-type]
        super().save_pretrained(save_directory, **kwargs)


def bayesian_lora_layers(model: nn.Module) -> Iterator[tuple[str, BayesianLoraLayerMixin]]:
    """Every layer of ``model`` with a Bayesian adapter, with its qualified name (the targets
    outside ``BayesianLoraConfig.layers`` are plain LoRA and not listed)."""
    for name, layer in custom_layers(model, BayesianLoraLayerMixin):
        if layer.is_bayesian():
            yield name, layer


_TUNER = CustomTuner(
    "Bayesian-LoRA",
    BayesianLoraPeftMixin,
    "BayesianLora",
    BayesianLoraLinear,
    "bayesian_lora_config",
)


def refresh_mean_weights(model: nn.Module) -> None:
    """Write every layer's posterior-mean ``A`` / ``B`` into PEFT's ``lora_A`` / ``lora_B``."""
    for _, layer in bayesian_lora_layers(model):
        for adapter in layer.lora_inducing_A:
            layer.refresh_mean_weights(adapter)


def get_bayesian_lora_model(
    model: nn.Module,
    lora_config: LoraConfig,
    config: BayesianLoraConfig | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` in a PEFT model whose LoRA linear layers are Bayesian-LoRA layers.

    The LoRA settings (rank, alpha, targets, dropout) are PEFT's; ``config`` adds the
    variational ones. The posteriors are kept in float32 whatever the base dtype.
    """
    config = config or BayesianLoraConfig()
    peft_model = _TUNER.build(model, lora_config, config, adapter_name)
    targets = list(custom_layers(peft_model, BayesianLoraLayerMixin))
    if not targets:
        warnings.warn(
            "no LoRA layer is Bayesian: LoraConfig.target_modules matched no nn.Linear "
            "(quantised bases are not supported by Bayesian-LoRA)",
            stacklevel=2,
        )
        return peft_model
    for name, layer in targets:
        if not config.is_bayesian(base_model_key(name)):
            layer.make_plain(adapter_name, lora_config.init_lora_weights)
    layers = [layer for _, layer in bayesian_lora_layers(peft_model)]
    if not layers:
        names = ", ".join(sorted(base_model_key(n) for n, _ in targets)[:4])
        raise ConfigError(
            f"no LoRA target is Bayesian: BayesianLoraConfig.layers ({config.layers!r}, "
            f"--bayes-lora-layers) matches none of the targets ({names}, ...); the default "
            "names the authors' Llama-style layers, pass '.*' to make every target Bayesian"
        )
    for layer in layers:
        layer.freeze_mean_copies()
    return peft_model


def base_model_key(name: str) -> str:
    """A module's name in the base model (what ``LoraConfig.target_modules`` and
    ``BayesianLoraConfig.layers`` match) from its name in the PEFT model."""
    prefix = "base_model.model."
    return name[len(prefix) :] if name.startswith(prefix) else name


@contextmanager
def sampling(model: nn.Module, enabled: bool, mode: str | None = None) -> Iterator[nn.Module]:
    """Turn weight sampling on or off for every Bayesian-LoRA layer inside the block.

    Off gives the posterior-mean factors. ``mode`` (``SAMPLE_MODES``) overrides how samples are
    shared within a forward: ``independent`` when sample copies share a batch.
    """
    if mode is not None and mode not in SAMPLE_MODES:
        raise ConfigError(f"sample mode must be one of {SAMPLE_MODES}, got {mode!r}")
    values: dict[str, Any] = {"bl_sampling": bool(enabled)}
    if mode is not None:
        values["bl_mode_override"] = mode
    with layer_attributes([layer for _, layer in bayesian_lora_layers(model)], **values):
        yield model


@contextmanager
def pinned_factors(model: nn.Module) -> Iterator[nn.Module]:
    """Pin the prior's factorisations of every Bayesian-LoRA factor inside the block
    (:meth:`InducingWeight.pinned_factors`): for a prediction pass, during which the
    parameters do not change; draws with autograd on are unaffected."""
    every = (
        posterior
        for _, layer in bayesian_lora_layers(model)
        for posteriors in (layer.lora_inducing_A, layer.lora_inducing_B)
        for posterior in posteriors.values()
    )
    with pinned(every):
        yield model


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """``KL(q || p)`` summed over both factors of every layer's active adapters (float32)."""
    total = None
    for _, layer in bayesian_lora_layers(model):
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_inducing_A:
                continue
            for posterior in (layer.lora_inducing_A[adapter], layer.lora_inducing_B[adapter]):
                term = posterior.kl()
                total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def load_bayesian_lora_model(
    base_model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Restore a saved Bayesian-LoRA adapter (posteriors and mean copies) onto ``base_model``
    exactly; anything that does not fit raises ``CheckpointError``."""
    model = load_adapter_folder(
        base_model,
        directory,
        BayesianLoraConfig,
        get_bayesian_lora_model,
        adapter_name=adapter_name,
        is_trainable=is_trainable,
    )
    for _, layer in bayesian_lora_layers(model):
        layer.freeze_mean_copies()
    return model
