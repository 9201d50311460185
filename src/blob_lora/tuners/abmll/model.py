"""Building, sampling, the closed-form KLs, task posteriors, saving and loading ABMLL models on
top of PEFT's ``PeftModel``.

An ABMLL model *is* a PEFT model: ``get_abmll_model`` registers ``AbmllLinear`` as PEFT's custom
module for ``nn.Linear``. Its trainable parameters are the global pairs ``theta``; a task
posterior (:data:`TaskPosterior`) is installed around a block with :func:`task_posterior`. A
saved folder is PEFT's (``lora_A`` / ``lora_B``: the global mean, which plain PEFT loads as a
LoRA adapter) plus ``lora_sigma_*`` in the same safetensors file and ``abmll_config.json``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PeftModelForCausalLM
from peft.utils import set_peft_model_state_dict
from torch import nn

from blob_lora.tuners.abmll.config import AbmllConfig
from blob_lora.tuners.abmll.layer import PARTS, SAMPLE_MODES, AbmllLayerMixin, AbmllLinear
from blob_lora.tuners.blob.model import (
    ADAPTER_CONFIG,
    atomic_save_pretrained,
    check_adapter_fits,
    read_adapter_weights,
)
from blob_lora.utils.errors import CheckpointError, ConfigError

#: a task posterior: ``(layer name, adapter, part)`` -> tensor, ``part`` one of ``PARTS``
TaskPosterior = dict[tuple[str, str, str], torch.Tensor]


class AbmllPeftMixin:
    """Adds the ABMLL settings to ``save_pretrained``; atomic, safetensors only."""

    abmll_configs: dict[str, AbmllConfig]

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write a standard PEFT adapter folder of the *global* parameters (``lora_A`` /
        ``lora_B`` the global mean, ``lora_sigma_*`` its std pair) plus ``abmll_config.json``;
        every file is renamed into place. An installed task posterior is never saved."""

        def write_config(folder: Path, adapter: str) -> None:
            if adapter in self.abmll_configs:
                self.abmll_configs[adapter].save(folder)

        atomic_save_pretrained(
            super().save_pretrained,  # type: ignore[misc]
            save_directory,
            kwargs,
            list(self.peft_config),  # type: ignore[attr-defined]
            write_config,
        )


class AbmllPeftModel(AbmllPeftMixin, PeftModel):
    """A ``PeftModel`` with ABMLL layers (task type unspecified)."""


class AbmllPeftModelForCausalLM(AbmllPeftMixin, PeftModelForCausalLM):
    """A ``PeftModelForCausalLM`` with ABMLL layers."""


_MODEL_CLASSES: dict[str | None, type[PeftModel]] = {"CAUSAL_LM": AbmllPeftModelForCausalLM}


def abmll_layers(model: nn.Module) -> Iterator[tuple[str, AbmllLayerMixin]]:
    """Every ABMLL layer of ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, AbmllLayerMixin):
            yield name, module


def _adapters(layer: AbmllLayerMixin) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.lora_sigma_A]


def get_abmll_model(
    model: nn.Module,
    lora_config: LoraConfig,
    config: AbmllConfig | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` in a PEFT model whose LoRA linear layers are ABMLL layers.

    The LoRA settings (rank, alpha, targets, dropout) are PEFT's and shared by all four pairs;
    ``config`` adds ABMLL's own.
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    config = config or AbmllConfig()
    config.validate()
    if lora_config.use_dora:
        raise ConfigError("ABMLL is defined on plain LoRA; use_dora=True is not supported")
    quantised = sorted({type(m).__name__ for m in model.modules() if _is_quantised(m)})
    if quantised:
        raise ConfigError(
            f"ABMLL does not support quantised bases ({', '.join(quantised)}): load the base "
            "without --load-in-4bit / --load-in-8bit"
        )
    lora_config._register_custom_module({nn.Linear: partial(AbmllLinear, abmll_config=config)})
    cls = _MODEL_CLASSES.get(
        getattr(lora_config.task_type, "value", lora_config.task_type), AbmllPeftModel
    )
    peft_model = cls(model, lora_config, adapter_name=adapter_name, autocast_adapter_dtype=True)
    peft_model.abmll_configs = {adapter_name: config}
    if not any(True for _ in abmll_layers(peft_model)):
        warnings.warn(
            "no LoRA layer is an ABMLL layer: LoraConfig.target_modules matched no nn.Linear",
            stacklevel=2,
        )
    return peft_model


def _is_quantised(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "bitsandbytes"


@contextmanager
def sampling(
    model: nn.Module,
    enabled: bool,
    mode: str | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[nn.Module]:
    """Within the block, every ABMLL layer draws weights (``enabled``) or uses the means.

    ``mode`` (``SAMPLE_MODES``) says how samples are shared within a forward; ``generator``
    (on the model's device) makes the draws reproducible without touching the global RNG.
    """
    if mode is not None and mode not in SAMPLE_MODES:
        raise ConfigError(f"sample mode must be one of {SAMPLE_MODES}, got {mode!r}")
    layers = [layer for _, layer in abmll_layers(model)]
    saved = [(lay.abmll_sampling, lay.abmll_mode, lay.abmll_generator) for lay in layers]
    try:
        for layer in layers:
            layer.abmll_sampling = bool(enabled)
            if mode is not None:
                layer.abmll_mode = mode
            layer.abmll_generator = generator
        yield model
    finally:
        for layer, (flag, m, gen) in zip(layers, saved, strict=True):
            layer.abmll_sampling, layer.abmll_mode, layer.abmll_generator = flag, m, gen


# --- task posteriors ------------------------------------------------------------------------


def global_posterior(model: nn.Module, *, detach: bool) -> TaskPosterior:
    """``theta``'s pairs as a :data:`TaskPosterior`: the parameters themselves (so that a
    computation from them differentiates back to ``theta``) or, with ``detach``, float32 leaf
    copies that require grad (the start of a first-order adaptation)."""
    post: TaskPosterior = {}
    for name, layer in abmll_layers(model):
        for adapter in _adapters(layer):
            for part, t in layer.global_pairs(adapter).items():
                post[(name, adapter, part)] = (
                    t.detach().clone().requires_grad_(True) if detach else t
                )
    return post


@contextmanager
def task_posterior(model: nn.Module, posterior: TaskPosterior) -> Iterator[nn.Module]:
    """Within the block, every ABMLL layer's forward (and :func:`task_kl`) uses the task pairs
    of ``posterior`` instead of the global ones; it must cover every layer and part."""
    layers = dict(abmll_layers(model))
    expected = {(n, a, p) for n, lay in layers.items() for a in _adapters(lay) for p in PARTS}
    if set(posterior) != expected:
        missing, extra = sorted(expected - set(posterior)), sorted(set(posterior) - expected)
        raise ConfigError(
            f"task posterior does not fit this model: missing {missing[:3]}, extra {extra[:3]}"
        )
    saved = {name: layer.abmll_task for name, layer in layers.items()}
    try:
        for layer in layers.values():  # fresh dicts: an outer posterior stays as it was
            layer.abmll_task = {}
        for (name, adapter, part), tensor in posterior.items():
            layers[name].abmll_task.setdefault(adapter, {})[part] = tensor
        yield model
    finally:
        for name, layer in layers.items():
            layer.abmll_task = saved[name]


# --- the closed-form KLs --------------------------------------------------------------------


def gaussian_kl(
    mean_q: torch.Tensor, std_q: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor
) -> torch.Tensor:
    """``sum KL(N(mean_q, std_q^2) || N(mean_p, std_p^2))`` over entries (float32)."""
    var_q, var_p = std_q.float().square(), std_p.float().square()
    diff = (mean_q.float() - mean_p.float()).square()
    return 0.5 * (torch.log(var_p) - torch.log(var_q) + (var_q + diff) / var_p - 1.0).sum()


def task_kl(model: nn.Module) -> torch.Tensor:
    """``KL(q(phi_i) || p(phi_i | theta))`` summed over every layer: the installed task
    posterior against the global prior (0 when no task posterior is installed)."""
    total = torch.zeros(())
    for _, layer in abmll_layers(model):
        for adapter in _adapters(layer):
            if adapter not in layer.abmll_task:
                continue
            term = gaussian_kl(
                layer.mean_delta(adapter, "task"),
                layer.std_delta(adapter, "task"),
                layer.mean_delta(adapter, "global"),
                layer.std_delta(adapter, "global"),
            )
            total = total.to(term.device) + term
    return total


def hyper_kl(model: nn.Module) -> torch.Tensor:
    """``KL(p(. | theta) || N(0, hyper_prior_std^2))`` summed over every layer: the global
    regulariser (the hyper-prior of the paper's ``gamma`` term, see ``methods/abmll.py``)."""
    total = torch.zeros(())
    for _, layer in abmll_layers(model):
        for adapter in _adapters(layer):
            mean = layer.mean_delta(adapter, "global")
            std_p = torch.full_like(mean, layer.abmll_config.hyper_prior_std)
            term = gaussian_kl(
                mean, layer.std_delta(adapter, "global"), torch.zeros_like(mean), std_p
            )
            total = total.to(term.device) + term
    return total


# --- loading --------------------------------------------------------------------------------


def load_abmll_model(
    base_model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Restore saved global ABMLL parameters onto ``base_model`` exactly; a folder that is
    not ABMLL's, is corrupt (unreadable, non-finite values) or was made for another base model
    raises ``CheckpointError``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"adapter folder {directory} does not exist")
    try:
        lora_config = LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG} is missing or corrupt: {exc}") from exc
    config = AbmllConfig.load(directory)
    lora_config.inference_mode = not is_trainable
    state = read_adapter_weights(directory)
    bad = sorted(k for k, v in state.items() if not torch.isfinite(v).all())
    if bad:
        raise CheckpointError(f"adapter in {directory} holds non-finite values in {bad[:3]}")
    if not any("lora_sigma_" in k for k in state):
        raise CheckpointError(
            f"{directory} holds no lora_sigma_* tensors: a plain LoRA adapter, not ABMLL's"
        )
    model = get_abmll_model(base_model, lora_config, config, adapter_name=adapter_name)
    check_adapter_fits(model, state, directory, adapter_name)
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if not is_trainable:
        model.eval()
    return model
