"""ABMLL layers: PEFT LoRA layers whose weight update is an entrywise Gaussian with a LoRA-pair
mean and a LoRA-pair-plus-constant standard deviation.

For a base weight ``W0`` (``out x in``) and LoRA scaling ``s``, one set of pairs ``P = (A, B,
A_sigma, B_sigma)`` defines the Gaussian over the update ``Delta``::

    mean(P) = s * B @ A                     std(P) = max(|B_sigma @ A_sigma + c|, c)
    Delta_jk ~ N(mean_jk, std_jk^2), independently.

The *global* pairs (``theta``, the prior ``p(phi | theta)``) are trainable adapter state: the
mean pair is PEFT's own ``lora_A`` / ``lora_B`` (so a saved folder is a plain PEFT LoRA of the
global mean) and the std pair is ``lora_sigma_A`` / ``lora_sigma_B`` (``B_sigma`` starts at zero,
so every std starts at ``c``). A *task* posterior ``q(phi_i)`` is a second set of the same four
tensors installed for a while (``model.task_posterior``); they are plain tensors, not
parameters, so adaptation can differentiate through them and a saved folder never holds one.

The forward adds ``x (mean + std * E)^T`` for one draw ``E ~ N(0, 1)`` (``out x in``): ``shared``
draws one ``E`` for the whole forward (training), ``independent`` one per sequence (prediction
with several samples folded into the batch). The mean term is computed exactly as PEFT's LoRA
forward computes it, so with the std at zero the layer's output equals plain LoRA's bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from blob_lora.tuners.abmll.config import AbmllConfig
from blob_lora.tuners.blob.noise import as_sequences
from blob_lora.tuners.tied_weights import UntieOnMerge

#: ``shared``: one weight sample for the whole forward; ``independent``: one per sequence (a
#: cloze sequence packs all options of a question, so they share one sample)
SAMPLE_MODES = ("shared", "independent")
#: the four tensors of one set of pairs, in this order everywhere
PARTS = ("A", "B", "sigma_A", "sigma_B")


class AbmllLayerMixin:
    """The Bayesian part of an ABMLL layer; mixed into a PEFT ``LoraLayer`` subclass."""

    # PEFT treats every name listed here as adapter state: trainable, saved, moved, deleted;
    # its state-dict helpers keep keys containing "lora_", hence the names.
    adapter_layer_names: tuple[str, ...] = (
        *LoraLayer.adapter_layer_names,
        "lora_sigma_A",
        "lora_sigma_B",
    )

    def _abmll_setup(self, config: AbmllConfig) -> None:
        self.abmll_config = config
        self.abmll_sampling = True
        self.abmll_mode = "shared"
        self.abmll_generator: torch.Generator | None = None
        # adapter -> the task posterior's four tensors (PARTS), while one is installed
        self.abmll_task: dict[str, dict[str, torch.Tensor]] = {}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs):
        if "lora_sigma_A" not in self.__dict__.get("_modules", {}):
            self.lora_sigma_A = nn.ModuleDict({})
            self.lora_sigma_B = nn.ModuleDict({})
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        sigma_a = nn.Linear(a.in_features, r, bias=False)
        sigma_b = nn.Linear(r, b.out_features, bias=False)
        # LoRA's own initialisation: A random, B zero, so std(P) = c everywhere at first and
        # B_sigma still receives gradients
        nn.init.kaiming_uniform_(sigma_a.weight, a=math.sqrt(5))
        nn.init.zeros_(sigma_b.weight)
        self.lora_sigma_A[adapter_name] = sigma_a.to(a.weight.device, a.weight.dtype)
        self.lora_sigma_B[adapter_name] = sigma_b.to(b.weight.device, b.weight.dtype)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- the two sets of pairs ---------------------------------------------------------------

    def global_pairs(self, adapter: str) -> dict[str, torch.Tensor]:
        """``theta``'s four tensors (the parameters themselves, not copies)."""
        return {
            "A": self.lora_A[adapter].weight,
            "B": self.lora_B[adapter].weight,
            "sigma_A": self.lora_sigma_A[adapter].weight,
            "sigma_B": self.lora_sigma_B[adapter].weight,
        }

    def pairs(self, adapter: str, which: str) -> dict[str, torch.Tensor]:
        """The pairs of ``which`` (``global`` or ``task``; ``task`` falls back to ``global``
        when no task posterior is installed)."""
        if which == "task" and adapter in self.abmll_task:
            return self.abmll_task[adapter]
        return self.global_pairs(adapter)

    def mean_delta(self, adapter: str, which: str) -> torch.Tensor:
        """``s B A`` (``out x in``, float32)."""
        p = self.pairs(adapter, which)
        return self.scaling[adapter] * (p["B"].float() @ p["A"].float())

    def std_delta(self, adapter: str, which: str) -> torch.Tensor:
        """``|B_sigma A_sigma + c|`` floored at ``c`` (``out x in``, float32): the sign of the
        paper's linear form is irrelevant (only its square enters the Gaussian); the floor
        keeps the KL finite where the form crosses zero (``AbmllConfig.std_constant``)."""
        p = self.pairs(adapter, which)
        cfg = self.abmll_config
        std = p["sigma_B"].float() @ p["sigma_A"].float() + cfg.std_constant
        return std.abs().clamp_min(cfg.std_constant)

    # --- forward ------------------------------------------------------------------------------

    def _abmll_active(self) -> bool:
        if self.disable_adapters or self.merged:
            return False
        return any(a in self.lora_sigma_A for a in self.active_adapters)

    def _noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.randn(
            shape, generator=self.abmll_generator, device=like.device, dtype=like.dtype
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._abmll_active() or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        if not self.abmll_sampling and not self.abmll_task:
            return super().forward(x, *args, **kwargs)  # the global mean: PEFT's LoRA itself
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_sigma_A:
                continue
            lora_a = self.lora_A[adapter]
            x_in = self.lora_dropout[adapter](self._cast_input_dtype(x, lora_a.weight.dtype))
            if adapter in self.abmll_task:
                p = self.abmll_task[adapter]
                out = F.linear(F.linear(x_in, p["A"]), p["B"]) * self.scaling[adapter]
            else:  # the very expression of PEFT's LoRA forward: zero std gives LoRA exactly
                out = self.lora_B[adapter](lora_a(x_in)) * self.scaling[adapter]
            if self.abmll_sampling:
                std = self.std_delta(adapter, "task").to(x_in.dtype)
                if self.abmll_mode == "independent":
                    seq = as_sequences(x_in)
                    noise = std * self._noise((seq.shape[0], *std.shape), std)
                    extra = torch.bmm(seq, noise.transpose(1, 2)).reshape(*out.shape)
                else:
                    extra = F.linear(x_in, std * self._noise(tuple(std.shape), std))
                out = out + extra
            result = result + out.to(result_dtype)
        return result.to(result_dtype)


class AbmllLinear(AbmllLayerMixin, UntieOnMerge, LoraLinear):
    """ABMLL on a floating-point ``nn.Linear`` (fp32, bf16, fp16 bases)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, *, abmll_config: AbmllConfig, **kw: Any
    ):
        self._abmll_setup(abmll_config)
        super().__init__(base_layer, adapter_name, **kw)

    def __repr__(self) -> str:
        return "abmll." + super().__repr__()
