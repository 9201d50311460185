"""BLoB layers: PEFT LoRA layers whose ``A`` has a learned elementwise std.

``BlobLayerMixin`` holds everything Bayesian (the std parameters, the sampling switch and the
sampled forward) and is combined with PEFT's own LoRA layer classes, so the mean path, merging,
adapter switching and saving all stay PEFT's. With sampling off the forward *is* PEFT's forward,
which makes the mean model bit-identical to plain LoRA with the same weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from blob_lora.tuners.blob.config import BlobConfig
from blob_lora.tuners.blob.noise import sample_lora_hidden
from blob_lora.tuners.tied_weights import UntieOnMerge


def std_from_param(rho: torch.Tensor, std_param: str) -> torch.Tensor:
    """Map the free std parameter to the std (elementwise square or softplus)."""
    if std_param == "square":
        return rho * rho
    return F.softplus(rho)


def init_std_param(rho: torch.Tensor, init_std: float, std_param: str) -> None:
    """Initialise so that the std lies in [eps**2/2, eps**2] (method doc, section 1)."""
    with torch.no_grad():
        if std_param == "square":
            rho.uniform_(init_std / math.sqrt(2.0), init_std)
        else:
            target = torch.empty_like(rho, dtype=torch.float32).uniform_(
                init_std**2 / 2.0, init_std**2
            )
            rho.copy_(torch.log(torch.expm1(target)))  # inverse softplus


class BlobLayerMixin:
    """The Bayesian part of a BLoB layer; mixed into a PEFT ``LoraLayer`` subclass."""

    # PEFT treats every name listed here as adapter state: trainable, saved, moved, deleted.
    adapter_layer_names: tuple[str, ...] = (*LoraLayer.adapter_layer_names, "lora_A_rho")
    other_param_names: tuple[str, ...] = (
        *LoraLayer.other_param_names,
        "blob_std_param",
        "blob_flipout",
        "blob_prior_std",
    )

    def _blob_setup(self, blob_config: BlobConfig) -> None:
        self._blob_init = blob_config
        self.blob_sampling = True
        self.blob_noise_mode_override: str | None = None
        self.blob_eval_noise = blob_config.eval_noise  # of predictive samples (model.eval_noise)
        self.blob_eval_samples = blob_config.eval_samples  # their default number

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs):
        if "lora_A_rho" not in self.__dict__.get("_modules", {}):
            self.lora_A_rho = nn.ParameterDict({})
            self.blob_std_param: dict[str, str] = {}
            self.blob_flipout: dict[str, str] = {}
            self.blob_prior_std: dict[str, float] = {}
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        blob = self._blob_init
        weight = self.lora_A[adapter_name].weight
        rho = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device=weight.device))
        init_std_param(rho, blob.init_std, blob.std_param)
        self.lora_A_rho[adapter_name] = rho
        self.blob_std_param[adapter_name] = blob.std_param
        self.blob_flipout[adapter_name] = blob.flipout
        self.blob_prior_std[adapter_name] = blob.prior_std
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def make_deterministic(self, adapter_name: str) -> None:
        """Drop the std of one adapter: this layer then stays plain LoRA for it."""
        if adapter_name in self.lora_A_rho:
            del self.lora_A_rho[adapter_name]

    def lora_A_std(self, adapter_name: str) -> torch.Tensor:
        return std_from_param(self.lora_A_rho[adapter_name], self.blob_std_param[adapter_name])

    def _blob_sampling_active(self) -> bool:
        if not self.blob_sampling or self.disable_adapters or self.merged:
            return False
        return any(a in self.lora_A_rho for a in self.active_adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._blob_sampling_active() or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a = self.lora_A[adapter]
            x_in = self.lora_dropout[adapter](self._cast_input_dtype(x, lora_a.weight.dtype))
            if adapter in self.lora_A_rho:
                mode = self.blob_noise_mode_override or self.blob_flipout[adapter]
                hidden = sample_lora_hidden(x_in, lora_a.weight, self.lora_A_std(adapter), mode)
            else:
                hidden = lora_a(x_in)
            result = result + self.lora_B[adapter](hidden) * self.scaling[adapter]
        return result.to(result_dtype)


class BlobLinear(BlobLayerMixin, UntieOnMerge, LoraLinear):
    """BLoB on a floating-point ``nn.Linear`` (fp32, bf16, fp16 bases)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, *, blob_config: BlobConfig, **kw):
        self._blob_setup(blob_config)
        super().__init__(base_layer, adapter_name, **kw)

    def flat_parts(self) -> list[nn.Module] | None:
        """The modules whose outputs this layer's forward adds up, each on a row-wise input
        (``models.forward.FLAT_PARTS``): the base layer and each active adapter's ``lora_B``
        (sampling or not, the forward is ``base(x) + sum_a lora_B[a](h_a) * scaling``, ``h_a``
        computed row by row: the std of ``A`` enters through ``h_a``, so the noise stays that
        of the whole rows); the base layer alone while merged or disabled. None while an
        adapter with a LoRA variant (DoRA) is active: PEFT computes that product itself."""
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.lora_B]
        if self.merged or self.disable_adapters or not active:
            return [base]
        if any(a in getattr(self, "lora_variant", {}) or self.use_dora.get(a) for a in active):
            return None
        return [base, *(self.lora_B[a] for a in active)]

    def __repr__(self) -> str:
        return "blob." + super().__repr__()


def quantized_layer_classes(blob_config: BlobConfig) -> dict[type, Any]:
    """BLoB versions of PEFT's bitsandbytes LoRA layers, when bitsandbytes is importable.

    They reuse ``BlobLayerMixin.forward`` unchanged: only the base-layer call differs, and that is
    the quantised module's own ``__call__``.
    """
    from functools import partial

    mapping: dict[type, Any] = {}
    try:
        import bitsandbytes as bnb  # noqa: F401
        from peft.tuners.lora import bnb as peft_bnb
    except Exception:  # bitsandbytes missing or unusable (no GPU): plain path only
        return mapping
    for bnb_name, peft_name in (("Linear8bitLt", "Linear8bitLt"), ("Linear4bit", "Linear4bit")):
        base_cls = getattr(bnb.nn, bnb_name, None)
        peft_cls = getattr(peft_bnb, peft_name, None)
        if base_cls is None or peft_cls is None:
            continue
        blob_cls = _quantized_blob_class(peft_cls)
        mapping[base_cls] = partial(blob_cls, blob_config=blob_config)
    return mapping


_QUANTIZED_CACHE: dict[type, type] = {}


def _quantized_blob_class(peft_cls: type) -> type:
    if peft_cls not in _QUANTIZED_CACHE:

        def __init__(self, base_layer, adapter_name, *, blob_config, **kw):  # noqa: N807
            self._blob_setup(blob_config)
            peft_cls.__init__(self, base_layer, adapter_name, **kw)

        _QUANTIZED_CACHE[peft_cls] = type(
            f"Blob{peft_cls.__name__}", (BlobLayerMixin, peft_cls), {"__init__": __init__}
        )
    return _QUANTIZED_CACHE[peft_cls]
