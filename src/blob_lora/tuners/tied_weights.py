"""Merging an adapter into a base weight that another module shares.

Small causal LMs tie the output head to the input embedding (SmolLM2, Qwen2-0.5B, Gemma, GPT-2:
``lm_head.weight is embed_tokens.weight``), and ``lm_head`` is one of the default targets. PEFT's
LoRA merge adds the delta to the base weight *in place*, so merging an adapted ``lm_head`` also
adds it to the input embedding, and the merged model no longer computes what the adapter did
(on a tiny tied Llama: logits off by 11.6). The adapter never trained the embedding: during
training the delta is a separate path beside the frozen shared weight.

A layer with :class:`UntieOnMerge` gives its base layer a private copy of the shared weight
before its first merge, so the delta lands in the head alone; unmerging puts the shared weight
back, the very tensor, so the tie and its values return exactly. ``merge_and_unload`` keeps the
private copy, and PEFT then sets ``tie_word_embeddings=False`` in the model's config (it does so
whenever the two weights differ after a merge), so a saved merged model reloads untied. The
copy is made only for a shared weight (:func:`mark_shared_base_weights`), so merging the other
layers costs no memory.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: PEFT's warnings on wrapping a model whose targeted module is tied, and on merging one: both
#: are about the in-place merge, which :class:`UntieOnMerge` makes safe for the custom tuners.
PEFT_TIED_WARNINGS = (
    r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
    r"Model with `tie_word_embeddings=True` and the tied_target_modules=",
)


@contextmanager
def without_tied_warnings() -> Iterator[None]:
    """PEFT's tied-module warnings silenced (only those) within the block."""
    with warnings.catch_warnings():
        for message in PEFT_TIED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


class UntieOnMerge:
    """For a tuner's LoRA layer (before PEFT's ``Linear`` in the bases): merging writes into a
    private copy of the base weight when that weight is shared (``base_weight_shared``)."""

    #: set by :func:`mark_shared_base_weights` on the layers whose base weight is shared
    base_weight_shared: bool = False
    #: the shared weight while this layer's base layer holds a merged private copy (in a tuple:
    #: a Parameter set as a module attribute would become one of the layer's own parameters)
    _shared_base_weight: tuple[nn.Parameter, ...] = ()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        untied = self.base_weight_shared and not self._shared_base_weight
        if untied:
            base = self.get_base_layer()  # type: ignore[attr-defined]
            self._shared_base_weight = (base.weight,)
            base.weight = nn.Parameter(
                base.weight.detach().clone(), requires_grad=base.weight.requires_grad
            )
        try:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)  # type: ignore[misc]
        finally:
            if untied and not self.merged:  # type: ignore[attr-defined]
                self._retie()  # nothing was merged (an error, no adapter named)

    def unmerge(self) -> None:
        super().unmerge()  # type: ignore[misc]
        if not self.merged:  # type: ignore[attr-defined]
            self._retie()

    def _retie(self) -> None:
        if self._shared_base_weight:
            (shared,) = self._shared_base_weight
            self.get_base_layer().weight = shared  # type: ignore[attr-defined]
            self._shared_base_weight = ()


def mark_shared_base_weights(model: nn.Module) -> list[str]:
    """Set ``base_weight_shared`` on every :class:`UntieOnMerge` layer of ``model`` whose base
    weight is also a parameter of another module (the same tensor, or another over the same
    memory with the same shape); the names of those layers. A tensor without memory (on the
    meta device, a model not yet materialised) or a shard counts as shared only when it is
    the same tensor."""
    params = model.named_parameters(remove_duplicate=False)
    owners: Counter[Any] = Counter(_storage_key(p) for _, p in params)
    shared = []
    for name, module in model.named_modules():
        if isinstance(module, UntieOnMerge):
            weight = getattr(module.get_base_layer(), "weight", None)  # type: ignore[attr-defined]
            module.base_weight_shared = weight is not None and owners[_storage_key(weight)] > 1
            if module.base_weight_shared:
                shared.append(name)
    return shared


def _storage_key(t: torch.Tensor) -> Any:
    if t.device.type == "meta" or t.numel() == 0 or type(t.data) is not torch.Tensor:
        return ("object", id(t))  # no memory yet, or a subclass (a shard) with its own layout
    return ("memory", t.device, t.data_ptr(), tuple(t.shape), t.stride())
