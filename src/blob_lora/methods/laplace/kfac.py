"""Kronecker-factored curvature for the trainable ``nn.Linear`` layers of a model.

Why this file exists: Laplace-LoRA needs, per LoRA matrix, a posterior precision it can invert
and take a log determinant of cheaply. KFAC writes the layer's GGN block as ``A ⊗ G`` with
``A`` the second moment of the layer input and ``G`` that of the output gradient, so both
operations reduce to two small eigendecompositions.

Conventions (used by :mod:`posterior` too):

* A layer's weight ``W`` is ``out × in``; a trainable bias is folded in as an extra input
  coordinate fixed at 1 (``in`` then counts it).
* Activations are seen as ``(B, T, in)``: ``T`` token positions share the weight. Inputs of rank
  2 are one position; higher ranks are flattened to positions.
* Output gradients live on a *row support*: the output coordinates that ever received a nonzero
  gradient. For LoRA's ``lm_head`` ``lora_B`` (``out`` = vocabulary) only the C option-token rows
  do, so ``G`` is stored as an ``s × s`` matrix on that support instead of ``vocab × vocab``.
  Rows outside the support have zero curvature: their posterior equals the prior.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from blob_lora.utils.errors import ConfigError

KFAC_TYPES = ("expand", "reduce")


def trainable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose weight is trainable, keyed by module name.

    Refuses models with any other trainable parameter: KFAC needs per-example activations and
    output gradients, which hooks on ``nn.Linear`` give us; other parameters would need
    per-example gradients (a different, much costlier machinery), and silently ignoring them
    would give a posterior over the wrong parameter set.
    """
    linears: dict[str, nn.Linear] = {}
    covered: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            linears[name] = module
            covered.add(id(module.weight))
            if module.bias is not None and module.bias.requires_grad:
                covered.add(id(module.bias))
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        raise ConfigError(
            "Laplace-LoRA supports only trainable nn.Linear weights/biases (e.g. LoRA's lora_A/"
            f"lora_B); these trainable parameters are not: {shown}. Freeze them first."
        )
    if not linears:
        raise ConfigError(
            "the model has no trainable nn.Linear layer to put a Laplace posterior on"
        )
    return linears


def has_trainable_bias(module: nn.Linear) -> bool:
    return module.bias is not None and module.bias.requires_grad


def layer_dims(module: nn.Linear) -> tuple[int, int]:
    """``(in, out)`` of the Kronecker factors, ``in`` including the bias coordinate."""
    return module.in_features + int(has_trainable_bias(module)), module.out_features


def as_positions(x: Tensor, batch_size: int, name: str) -> Tensor:
    """View a layer input/output as ``(B, T, features)``."""
    if x.dim() < 2 or x.shape[0] != batch_size:
        raise ConfigError(
            f"layer {name!r} saw a tensor of shape {tuple(x.shape)}; KFAC needs the batch "
            f"dimension ({batch_size}) first so that examples stay separate"
        )
    if x.dim() == 2:
        return x[:, None, :]
    return x.reshape(batch_size, -1, x.shape[-1])


def position_mask(
    mask: Tensor | None, batch_size: int, n_pos: int, head_mask: Tensor | None = None
) -> Tensor | None:
    """Which of a layer's ``n_pos`` positions are real tokens (not padding).

    The batch's ``attention_mask`` is ``(B, L)``. A layer that sees fewer positions than ``L``
    (the output head) sees ``head_mask``'s positions when that is ``(B, n_pos)`` (the positions
    a cloze forward hands the head, ``models.forward.head_read_mask``), else the last ones
    (``lm_head`` with ``logits_to_keep``). Anything else: all positions count.
    """
    if mask is None or mask.dim() != 2 or mask.shape[0] != batch_size:
        return None
    if mask.shape[1] < n_pos:
        return None
    own = head_mask is not None and tuple(head_mask.shape) == (batch_size, n_pos)
    if own and mask.shape[1] > n_pos:
        return head_mask.to(device=mask.device, dtype=torch.bool)
    return mask[:, mask.shape[1] - n_pos :].to(torch.bool)


def augment_input(a: Tensor, module: nn.Linear) -> Tensor:
    """Append the constant-1 bias coordinate when the bias is trainable."""
    if has_trainable_bias(module):
        return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a


class LayerCapture:
    """Forward hooks that keep each layer's input (detached) and output (in the graph).

    Output gradients are then obtained with ``torch.autograd.grad(logits, outputs, v)``: this
    gives the per-example, per-position gradients KFAC needs without touching ``.grad`` of the
    parameters and without computing weight gradients at all.
    """

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if name in self.outputs:
                raise ConfigError(
                    f"layer {name!r} was called twice in one forward pass; Laplace-LoRA's KFAC "
                    "does not support weight sharing across calls"
                )
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output

        return hook

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    @contextmanager
    def active(self) -> Iterator[LayerCapture]:
        self.clear()
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    def output_grads(self, logits: Tensor, v: Tensor) -> dict[str, Tensor]:
        """``∂<logits, v>/∂output`` per captured layer (zero tensors for unused layers)."""
        names = [n for n, o in self.outputs.items() if o.requires_grad]
        outs = [self.outputs[n] for n in names]
        grads = torch.autograd.grad(
            logits, outs, grad_outputs=v, retain_graph=True, allow_unused=True
        )
        return {
            n: (torch.zeros_like(o) if g is None else g)
            for n, o, g in zip(names, outs, grads, strict=True)
        }


@dataclass
class KronAccumulator:
    """Running sums of one layer's Kronecker factors.

    ``expand`` (default): every (real) token position is a sample of the input, and every
    position's output gradient a sample of the gradient:
    ``A = Σ_{n,t} a aᵀ / #positions``, ``G = Σ_{n,t,c} g gᵀ / N``.
    ``reduce``: the positions of one example are pooled first:
    ``A = Σ_n ā ā ᵀ / N`` with ``ā`` the mean over real positions, ``G = Σ_{n,c} ĝ ĝᵀ / N`` with
    ``ĝ = Σ_t g``. Both equal the exact per-example GGN block when there is one position.
    """

    in_dim: int
    out_dim: int
    kfac_type: str
    dtype: torch.dtype = torch.float64
    a_sum: Tensor = field(init=False)
    a_count: float = 0.0
    support: Tensor = field(init=False)
    g_sum: Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.kfac_type not in KFAC_TYPES:
            raise ConfigError(f"kfac_type must be one of {KFAC_TYPES}, got {self.kfac_type!r}")
        self.a_sum = torch.zeros(self.in_dim, self.in_dim, dtype=self.dtype)
        self.support = torch.zeros(0, dtype=torch.long)
        self.g_sum = torch.zeros(0, 0, dtype=self.dtype)

    def input_moment(self, a: Tensor, valid: Tensor | None) -> tuple[Tensor, float]:
        """This batch's contribution to ``A``: ``(Σ aaᵀ, count)`` for ``a`` ``(B, T, in)`` and
        ``valid`` ``(B, T)`` bool or None (all positions real). Computed in ``a``'s dtype (the
        products of one batch are short sums), accumulated in ``self.dtype``."""
        if valid is None:
            valid = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
        if self.kfac_type == "expand":
            rows = a[valid]
            return (rows.T @ rows).to(self.dtype).cpu(), float(rows.shape[0])
        w = valid.to(a.dtype)
        mean = (a * w[..., None]).sum(1) / w.sum(1).clamp_min(1.0)[:, None]
        return (mean.T @ mean).to(self.dtype).cpu(), float(a.shape[0])

    def add_input_moment(self, moment: tuple[Tensor, float]) -> None:
        self.a_sum += moment[0]
        self.a_count += moment[1]

    def add_inputs(self, a: Tensor, valid: Tensor | None) -> None:
        self.add_input_moment(self.input_moment(a, valid))

    def _grow_support(self, rows: Tensor) -> None:
        new = torch.unique(torch.cat([self.support, rows]))
        if new.numel() == self.support.numel():
            return
        pos = torch.searchsorted(new, self.support)
        grown = torch.zeros(new.numel(), new.numel(), dtype=self.dtype)
        grown[pos[:, None], pos[None, :]] = self.g_sum
        self.support, self.g_sum = new, grown

    def add_output_grads(self, g: Tensor) -> None:
        """``g``: ``(B, T, out)`` output gradients of one backward pass (products in ``g``'s
        dtype, accumulated in ``self.dtype``)."""
        flat = g.reshape(-1, g.shape[-1]) if self.kfac_type == "expand" else g.sum(1)
        if self.support.numel() < self.out_dim:  # full support: nothing left to discover
            rows = torch.nonzero((flat != 0).any(0)).flatten().cpu()
            if rows.numel() == 0:
                return
            self._grow_support(rows)
        sub = flat if self.support.numel() == self.out_dim else flat[:, self.support.to(g.device)]
        self.g_sum += (sub.T @ sub).to(self.dtype).cpu()
