"""Run a transformer from block ``start`` on, given the hidden states that blocks ``[:start]``
produced earlier.

When the first ``start`` blocks are deterministic (no adapter, no noise, no dropout), their
output can be computed once and reused: for all ``N`` samples of a Bayesian predictive
(``blob_lora.prediction.fast``) and for every epoch and every run on the same examples
(``blob_lora.models.prefix_cache``). The rest of the forward goes through the model's *own*
``forward`` (so masks, rotary embeddings, the final norm and the head are exactly the model's):
the prefix blocks are swapped for pass-through modules and the last of them returns the
cached hidden states.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from blob_lora.models.forward import answer_logits


@dataclass
class PrefixPlan:
    """Blocks ``layers[:start]`` are deterministic and run once; ``start`` >= 1."""

    layers: nn.ModuleList = field(repr=False)
    start: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def block_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    """Every ``ModuleList`` named like a decoder's list of blocks (``layers`` or ``h``)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and re.search(r"(^|\.)(layers|h)$", name)
    }


def block_index(name: str, list_name: str) -> int | None:
    """The block a qualified module/parameter name lies in (``None``: outside the blocks)."""
    m = re.match(rf"^{re.escape(list_name)}\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None


class _PrefixDone(Exception):
    """Raised by the capture hook to skip the rest of the forward."""


def capture_prefix(model: nn.Module, plan: PrefixPlan, batch: dict[str, Tensor]) -> Any:
    """The output of block ``start - 1`` for ``batch`` (the rest of the forward is skipped)."""
    holder: dict[str, Any] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        holder["out"] = output
        raise _PrefixDone

    handle = plan.layers[plan.start - 1].register_forward_hook(hook)
    try:
        answer_logits(model, batch, torch.zeros(1, dtype=torch.long))
    except _PrefixDone:
        pass
    finally:
        handle.remove()
    if "out" not in holder:
        raise RuntimeError("the prefix capture hook never ran: the model skipped its blocks")
    return holder["out"]


def hidden_of(output: Any) -> Tensor:
    """The hidden states in a block's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: Tensor) -> Any:
    """``output`` in the same form (tensor or tuple) with ``hidden`` as its hidden states."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def select_and_repeat(output: Any, rows: Tensor | None, times: int) -> Any:
    """Rows ``rows`` of a captured block output, repeated ``times`` (sample-major order)."""
    hidden = hidden_of(output)
    if rows is not None:
        hidden = hidden.index_select(0, rows.to(hidden.device))
    if times > 1:
        hidden = hidden.repeat(times, *([1] * (hidden.dim() - 1)))
    return with_hidden(output, hidden)


class _PassThrough(nn.Module):
    """Stands in for a prefix block: returns its input unchanged (in the block's output form)."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.as_tuple else hidden_states


class _Inject(nn.Module):
    """Stands in for the last prefix block: returns the cached output.

    A forward whose batch is ``k`` times the cached one (a method that folds ``k`` samples
    into the batch with ``repeat_batch``) gets the cached output repeated ``k`` times in the
    same sample-major order, so folding methods need not know about the cache.
    """

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = hidden_of(self.output).shape[0]
        incoming = hidden_states.shape[0]
        if incoming == rows:
            return self.output
        if incoming % rows:
            raise RuntimeError(
                f"cached prefix has {rows} rows but the forward has {incoming}; "
                "it can only be repeated a whole number of times"
            )
        return select_and_repeat(self.output, None, incoming // rows)


@contextmanager
def injected_prefix(plan: PrefixPlan, output: Any) -> Iterator[None]:
    """Replace blocks ``[:start]`` so that a forward starts from ``output`` at block ``start``."""
    saved = [plan.layers[i] for i in range(plan.start)]
    as_tuple = isinstance(output, tuple)
    try:
        for i in range(plan.start - 1):
            plan.layers[i] = _PassThrough(as_tuple)
        plan.layers[plan.start - 1] = _Inject(output)
        yield
    finally:
        for i, block in enumerate(saved):
            plan.layers[i] = block
