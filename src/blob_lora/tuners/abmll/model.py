"""Building, sampling, the closed-form task KL and ``-log p(theta)``, task posteriors, saving and
loading ABMLL models on top of PEFT's ``PeftModel``.

An ABMLL model *is* a PEFT model: ``get_abmll_model`` registers ``AbmllLinear`` as PEFT's custom
module for ``nn.Linear``. Its trainable parameters are the global pairs ``theta``; a task
posterior (:data:`TaskPosterior`) is installed around a block with :func:`task_posterior`. A
saved folder is PEFT's (``lora_A`` / ``lora_B``: the global mean, which plain PEFT loads as a
LoRA adapter) plus ``lora_sigma_*`` in the same safetensors file and ``abmll_config.json``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from blob_lora.tuners.abmll.config import AbmllConfig
from blob_lora.tuners.abmll.layer import PARTS, SAMPLE_MODES, AbmllLayerMixin, AbmllLinear
from blob_lora.tuners.peft_adapter import (
    CustomTuner,
    OptionsPeftMixin,
    custom_layers,
    layer_attributes,
    load_adapter_folder,
)
from blob_lora.utils.errors import CheckpointError, ConfigError

#: a task posterior: ``(layer name, adapter, part)`` -> tensor, ``part`` one of ``PARTS``
TaskPosterior = dict[tuple[str, str, str], torch.Tensor]


class AbmllPeftMixin(OptionsPeftMixin):
    """Adds the ABMLL settings (``abmll_config.json``) to ``save_pretrained``; atomic. The
    folder holds the *global* parameters (``lora_A`` / ``lora_B`` the global mean,
    ``lora_sigma_*`` its std pair); an installed task posterior is never saved."""

    OPTIONS_ATTR = "abmll_configs"
    abmll_configs: dict[str, AbmllConfig]


def abmll_layers(model: nn.Module) -> Iterator[tuple[str, AbmllLayerMixin]]:
    """Every ABMLL layer of ``model`` with its qualified name."""
    return custom_layers(model, AbmllLayerMixin)


_TUNER = CustomTuner("ABMLL", AbmllPeftMixin, "Abmll", AbmllLinear, "abmll_config")


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
    config = config or AbmllConfig()
    peft_model = _TUNER.build(model, lora_config, config, adapter_name)
    if not any(True for _ in abmll_layers(peft_model)):
        warnings.warn(
            "no LoRA layer is an ABMLL layer: LoraConfig.target_modules matched no nn.Linear",
            stacklevel=2,
        )
    return peft_model


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
    values: dict[str, Any] = {"abmll_sampling": bool(enabled), "abmll_generator": generator}
    if mode is not None:
        values["abmll_mode"] = mode
    with layer_attributes([layer for _, layer in abmll_layers(model)], **values):
        yield model


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


def _sum_over_layers(
    model: nn.Module, term: Callable[[AbmllLayerMixin, str], torch.Tensor | None]
) -> torch.Tensor:
    """``term(layer, adapter)`` summed over every ABMLL layer and active adapter (float32;
    a ``None`` term is skipped, 0 when there is none)."""
    total = torch.zeros(())
    for _, layer in abmll_layers(model):
        for adapter in _adapters(layer):
            value = term(layer, adapter)
            if value is not None:
                total = total.to(value.device) + value
    return total


def task_kl(model: nn.Module) -> torch.Tensor:
    """``KL(q(phi_i) || p(phi_i | theta))`` summed over every layer: the installed task
    posterior against the global prior (0 when no task posterior is installed)."""

    def term(layer: AbmllLayerMixin, adapter: str) -> torch.Tensor | None:
        if adapter not in layer.abmll_task:
            return None
        return gaussian_kl(
            layer.mean_delta(adapter, "task"),
            layer.std_delta(adapter, "task"),
            layer.mean_delta(adapter, "global"),
            layer.std_delta(adapter, "global"),
        )

    return _sum_over_layers(model, term)


def hyper_nll(model: nn.Module) -> torch.Tensor:
    """``-log p(theta)`` summed over every weight entry: the global term of the objective,
    ``theta`` being a point estimate (``KL(q(theta) || p(theta)) = -log p(theta)``).

    ABML's hyper-prior, entry by entry: the prior's mean ``mu ~ N(0, hyper_prior_std^2)`` and
    its precision ``tau = 1 / sigma^2 ~ Gamma(hyper_shape, hyper_rate)`` (``AbmllConfig``).
    """

    def term(layer: AbmllLayerMixin, adapter: str) -> torch.Tensor:
        cfg = layer.abmll_config
        mean = layer.mean_delta(adapter, "global")
        std = layer.std_delta(adapter, "global")
        s, a, b = cfg.hyper_prior_std, cfg.hyper_shape, cfg.hyper_rate
        # -log N(mu; 0, s^2) = mu^2 / (2 s^2) + log(s sqrt(2 pi))
        normal = 0.5 * (mean / s).square() + math.log(s * math.sqrt(2 * math.pi))
        # -log Gamma(tau; a, b) = b tau - (a - 1) log tau - a log b + log Gamma(a), tau = std^-2
        log_tau = -2.0 * torch.log(std)
        gamma_ = b * torch.exp(log_tau) - (a - 1) * log_tau - a * math.log(b) + math.lgamma(a)
        return (normal + gamma_).sum()

    return _sum_over_layers(model, term)


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
    return load_adapter_folder(
        base_model,
        directory,
        AbmllConfig,
        get_abmll_model,
        adapter_name=adapter_name,
        is_trainable=is_trainable,
        check_state=_check_global_state,
    )


def _check_global_state(state: dict[str, torch.Tensor], directory: Path) -> None:
    """Refuse non-finite tensors (a diverged meta-training) and a plain LoRA folder (no std
    pair) before anything is built."""
    bad = sorted(k for k, v in state.items() if not torch.isfinite(v).all())
    if bad:
        raise CheckpointError(f"adapter in {directory} holds non-finite values in {bad[:3]}")
    if not any("lora_sigma_" in k for k in state):
        raise CheckpointError(
            f"{directory} holds no lora_sigma_* tensors: a plain LoRA adapter, not ABMLL's"
        )
