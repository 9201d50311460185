"""Bayesian-LoRA layers: PEFT LoRA layers whose ``A`` and ``B`` are drawn from inducing-weight
posteriors (``inducing.py``).

``BayesianLoraLayerMixin`` is combined with PEFT's own LoRA layer class, so dropout, scaling,
adapter switching and the save format stay PEFT's. The factors' weights are functions of their
posteriors, not free parameters: PEFT's ``lora_A`` / ``lora_B`` weights are kept frozen as the
*posterior-mean copies* that ``refresh_mean_weights`` writes before a save or a merge, which is
what makes a saved folder loadable by plain PEFT as the mean adapter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from blob_lora.tuners.bayesian_lora.config import BayesianLoraConfig
from blob_lora.tuners.bayesian_lora.inducing import InducingWeight
from blob_lora.tuners.blob.noise import as_sequences
from blob_lora.tuners.tied_weights import UntieOnMerge

#: ``shared``: one weight sample for the whole forward (the authors' training forward);
#: ``independent``: one per sequence (prediction with several samples folded into a batch; a
#: cloze sequence packs all options of a question, so they share one sample).
SAMPLE_MODES = ("shared", "independent")


class BayesianLoraLayerMixin:
    """The Bayesian part of a Bayesian-LoRA layer; mixed into a PEFT ``LoraLayer`` subclass."""

    # PEFT treats every name listed here as adapter state: trainable, saved, moved, deleted.
    adapter_layer_names: tuple[str, ...] = (
        *LoraLayer.adapter_layer_names,
        "lora_inducing_A",
        "lora_inducing_B",
    )

    def _bayesian_lora_setup(self, config: BayesianLoraConfig) -> None:
        self._bayesian_lora_init = config
        self.bl_sampling = True
        self.bl_mode_override: str | None = None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs):
        if "lora_inducing_A" not in self.__dict__.get("_modules", {}):
            self.lora_inducing_A = nn.ModuleDict({})
            self.lora_inducing_B = nn.ModuleDict({})
            # the adapters' summed output passes through it (no parameters, nothing saved), so
            # a cloze forward can cut it to the positions it reads, as it cuts the base layer's
            # input (``flat_parts``)
            self.bl_adapter_output = nn.Identity()
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        cfg = self._bayesian_lora_init
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        device = a.weight.device
        # float32 whatever the base dtype: the factorisations need it
        self.lora_inducing_A[adapter_name] = InducingWeight(a.out_features, a.in_features, cfg).to(
            device
        )
        self.lora_inducing_B[adapter_name] = InducingWeight(b.out_features, b.in_features, cfg).to(
            device
        )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self.refresh_mean_weights(adapter_name)

    def make_plain(self, adapter_name: str, init_lora_weights: Any = True) -> None:
        """Turn ``adapter_name`` of this layer into a plain LoRA adapter (a target outside
        ``BayesianLoraConfig.layers``): its posteriors are dropped and PEFT's ``lora_A`` /
        ``lora_B`` become its trainable weights again, initialised as PEFT initialises LoRA
        under ``init_lora_weights`` (the ``LoraConfig``'s; ``True``: ``B = 0``), so the
        layer's forward, save and merge are PEFT's own."""
        if adapter_name not in self.lora_inducing_A:
            return
        del self.lora_inducing_A[adapter_name]
        del self.lora_inducing_B[adapter_name]
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self.lora_A[adapter_name].weight.requires_grad_(True)
        self.lora_B[adapter_name].weight.requires_grad_(True)

    def is_bayesian(self) -> bool:
        """Whether any adapter of this layer is Bayesian (holds inducing posteriors)."""
        return len(self.lora_inducing_A) > 0

    def freeze_mean_copies(self) -> None:
        """PEFT marks ``lora_A`` / ``lora_B`` trainable; here they are derived copies."""
        for adapter in self.lora_inducing_A:
            self.lora_A[adapter].weight.requires_grad_(False)
            self.lora_B[adapter].weight.requires_grad_(False)

    @torch.no_grad()
    def refresh_mean_weights(self, adapter_name: str) -> None:
        """Write the posterior means of ``A`` and ``B`` into PEFT's ``lora_A`` / ``lora_B``."""
        if adapter_name not in self.lora_inducing_A:
            return
        for linear, posterior in (
            (self.lora_A[adapter_name], self.lora_inducing_A[adapter_name]),
            (self.lora_B[adapter_name], self.lora_inducing_B[adapter_name]),
        ):
            linear.weight.copy_(posterior.mean_weight().to(linear.weight.dtype))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        # merging folds in the posterior-mean adapter
        self.refresh_mean_weights(adapter)
        return super().get_delta_weight(adapter)

    def _bl_active(self) -> bool:
        if self.disable_adapters or self.merged:
            return False
        return any(a in self.lora_inducing_A for a in self.active_adapters)

    def factor_weights(self, adapter: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` for the forward: the posterior means with sampling off, else one draw
        (``n`` None) or ``n`` independent draws stacked along a first dimension."""
        a_post, b_post = self.lora_inducing_A[adapter], self.lora_inducing_B[adapter]
        if not self.bl_sampling:
            return a_post.mean_weight(), b_post.mean_weight()
        return a_post.sample_weight(n), b_post.sample_weight(n)

    def flat_parts(self) -> list[nn.Module] | None:
        """The modules whose outputs this layer's forward adds up, each on a row-wise input
        (``models.forward.FLAT_PARTS``): the base layer and ``bl_adapter_output``; the base
        layer alone while merged or disabled (PEFT's forward then runs it only); the base layer
        and the ``lora_B`` of each adapter where all are plain (``make_plain``), as for PEFT's
        own layer. The factors
        are still drawn per row of the uncut input, so the sampling is that of the whole rows.
        None where another kind of adapter is active beside these (PEFT's forward would run its
        ``lora_B`` on the cut rows)."""
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or self.disable_adapters or not active:
            return [base]
        if all(a in self.lora_inducing_A for a in active):
            return [base, self.bl_adapter_output]
        if not any(a in self.lora_inducing_A for a in active):  # plain LoRA: PEFT's forward
            return [base, *(self.lora_B[a] for a in active)]
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._bl_active() or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        mode = self.bl_mode_override or "shared"
        total: torch.Tensor | None = None
        for adapter in self.active_adapters:
            if adapter not in self.lora_inducing_A:
                continue
            x_in = self.lora_dropout[adapter](x.to(torch.float32))
            if self.bl_sampling and mode == "independent":
                seq = as_sequences(x_in)
                a, b = self.factor_weights(adapter, seq.shape[0])
                out = torch.bmm(torch.bmm(seq, a.transpose(1, 2)), b.transpose(1, 2))
                out = out.reshape(*x.shape[:-1], out.shape[-1])
            else:
                a, b = self.factor_weights(adapter, None)
                out = F.linear(F.linear(x_in, a), b)
            part = out * self.scaling[adapter]
            total = part if total is None else total + part
        if total is not None:
            result = result + self.bl_adapter_output(total).to(result_dtype)
        return result.to(result_dtype)


class BayesianLoraLinear(BayesianLoraLayerMixin, UntieOnMerge, LoraLinear):
    """Bayesian-LoRA on a floating-point ``nn.Linear`` (fp32, bf16, fp16 bases)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        *,
        bayesian_lora_config: BayesianLoraConfig,
        **kw: Any,
    ):
        self._bayesian_lora_setup(bayesian_lora_config)
        super().__init__(base_layer, adapter_name, **kw)

    def __repr__(self) -> str:
        return "bayesian_lora." + super().__repr__()
