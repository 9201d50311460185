"""Where a SWAG posterior's flat vector lives in a PEFT model: the LoRA tensors of one adapter.

The posterior names its tensors by adapter-independent keys, PEFT's parameter names without the
adapter's name (``...q_proj.lora_A.weight`` for ``...q_proj.lora_A.default.weight``), so a
posterior collected under adapter ``default`` applies to the same weights loaded as adapter
``m1`` of a MultiSWAG model.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from blob_lora.methods.swag.posterior import Layout, layout_of
from blob_lora.utils.errors import CheckpointError


def _adapter_pattern(adapter: str) -> re.Pattern[str]:
    return re.compile(rf"\.(lora_\w+?)\.{re.escape(adapter)}(\.|$)")


def adapter_key(name: str, adapter: str) -> str | None:
    """``name`` without its adapter segment, or ``None`` if it is no LoRA tensor of
    ``adapter``."""
    pattern = _adapter_pattern(adapter)
    if not pattern.search(name):
        return None
    return pattern.sub(r".\1\2", name, count=1)


class Binding:
    """The tensors of one adapter in a posterior's layout order: read them as one flat vector,
    or write one into them."""

    def __init__(self, params: list[nn.Parameter], layout: Layout) -> None:
        self.params, self.layout = params, layout

    @classmethod
    def trainable(cls, model: nn.Module, adapter: str = "default") -> Binding:
        """The trainable LoRA tensors of ``adapter`` (what SWAG collects during training)."""
        names, params = [], []
        for name, p in model.named_parameters():
            key = adapter_key(name, adapter)
            if p.requires_grad and key is not None:
                names.append(key)
                params.append(p)
        if not params:
            raise ValueError(f"the model has no trainable LoRA tensors of adapter {adapter!r}")
        return cls(params, layout_of(names, params))

    @classmethod
    def for_layout(cls, model: nn.Module, layout: Layout, adapter: str) -> Binding:
        """The tensors of ``adapter`` that a saved posterior's ``layout`` names, checked."""
        by_key = {}
        for name, p in model.named_parameters():
            key = adapter_key(name, adapter)
            if key is not None:
                by_key[key] = p
        missing = [k for k in layout.names if k not in by_key]
        if missing:
            raise CheckpointError(
                f"the SWAG posterior names {len(missing)} tensors adapter {adapter!r} lacks, "
                f"e.g. {missing[:2]} (made for another adapter layout?)"
            )
        params = [by_key[k] for k in layout.names]
        for key, p, shape in zip(layout.names, params, layout.shapes, strict=True):
            if tuple(p.shape) != shape:
                raise CheckpointError(
                    f"SWAG posterior: {key} has shape {shape} there, {tuple(p.shape)} here"
                )
        return cls(params, layout)

    @torch.no_grad()
    def flat(self) -> torch.Tensor:
        """The current values as one float64 vector (whole tensors under FSDP)."""
        parts = []
        for p in self.params:
            t = p.detach()
            if hasattr(t, "full_tensor"):  # an FSDP2 shard: every process gathers the whole
                t = t.full_tensor()
            parts.append(t.reshape(-1).to(torch.float64))
        return torch.cat(parts)

    @torch.no_grad()
    def assign(self, flat: torch.Tensor) -> None:
        """Write ``flat`` (layout order) into the tensors, cast to each tensor's dtype."""
        if flat.numel() != self.layout.numel:
            raise ValueError(f"vector has {flat.numel()} entries, layout {self.layout.numel}")
        start = 0
        for p in self.params:
            n = p.numel()
            p.copy_(flat[start : start + n].view(p.shape).to(p.device, p.dtype))
            start += n
