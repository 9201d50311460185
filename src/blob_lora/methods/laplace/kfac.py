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
  gradient. For LoRA's ``lm_head`` ``lora_B`` (``out`` = vocabulary) under letter scoring only
  the C option-token rows do, so ``G`` is stored as an ``s × s`` matrix on that support instead
  of ``vocab × vocab``. Rows outside the support have zero curvature: their posterior equals the
  prior.
* A support wider than ``dense_limit`` (the head under cloze scoring: an option's score is a
  log-softmax over the whole vocabulary, so every row gets a gradient) is not stored densely:
  SmolLM2's 49,152² would be 19 GB in float64 and its eigendecomposition hours on a CPU.
  ``G`` is then kept as a rank-``g_rank`` sketch ``F Fᵀ`` (``F``: ``out × g_rank``): gradient
  rows are buffered and, whenever ``g_rank`` of them are waiting, ``[Fᵀ; rows]`` is reduced to
  its top ``g_rank`` right singular directions (an incremental truncated SVD). The sketch is
  exact while the rows seen span at most ``g_rank`` dimensions; beyond, it keeps the leading
  directions and drops the rest. ``G``'s exact diagonal is kept beside it (``out`` floats), so
  the posterior can give the dropped part's diagonal back (:meth:`KronAccumulator.
  g_residual_diag`; without it the dropped directions keep the prior's precision, which on the
  head under cloze scoring made the predictive ~10x further from the exact one,
  ``results/laplace_head_fidelity/``). Low-rank Kronecker factors are how KFAC is made to fit
  large language models elsewhere too (Robeyns' ``bayesian-lora`` package, from the
  Laplace-LoRA authors, offers them for the 4096-wide factors of 7B models).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from blob_lora.utils.errors import ConfigError

KFAC_TYPES = ("expand", "reduce")
#: widest output support whose ``G`` is stored densely (float64: 134 MB, a ~10 s eigh)
DENSE_LIMIT = 4096
#: rank of ``G``'s sketch beyond that (the other factors of a q/v + head LoRA are <= 576 wide)
G_RANK = 512


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


def _rank_tolerance(vals: Tensor, shape: torch.Size) -> float:
    """Eigenvalues of a Gram matrix below this are rounding (the usual numerical-rank rule)."""
    if vals.numel() == 0:
        return 0.0
    return float(vals.max().clamp_min(0.0)) * max(shape) * torch.finfo(vals.dtype).eps


def fewest_rows(y: Tensor, dtype: torch.dtype, chunk: int = 64) -> Tensor:
    """``y``: ``(P, C, out)``, C rows per position. Returns rows ``R`` with ``Rᵀ R = Σ_p
    y_pᵀ y_p`` (to rounding), as few as the rows of each position span: ``W_pᵀ y_p`` for the
    eigenvectors ``W_p`` of ``y_p y_pᵀ`` (``C × C``) above the numerical-rank tolerance.
    Positions go ``chunk`` at a time, in ``dtype``, so the float64 copy stays small."""
    parts = []
    for start in range(0, y.shape[0], chunk):
        block = y[start : start + chunk].to(dtype)
        vals, vecs = torch.linalg.eigh(block @ block.transpose(1, 2))  # (p, C), (p, C, C)
        rows = vecs.transpose(1, 2) @ block  # (p, C, out): row i has squared norm vals[i]
        tol = (
            vals.amax(1, keepdim=True).clamp_min(0.0)
            * max(block.shape[1:])
            * torch.finfo(dtype).eps
        )
        parts.append(rows[vals > tol])
    return torch.cat(parts) if parts else y.new_zeros(0, y.shape[-1], dtype=dtype)


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
    dense_limit: int = DENSE_LIMIT
    g_rank: int = G_RANK
    a_sum: Tensor = field(init=False)
    a_count: float = 0.0
    support: Tensor = field(init=False)
    g_sum: Tensor = field(init=False)
    #: ``out × k`` with ``G·N ≈ F Fᵀ`` once the support outgrew ``dense_limit`` (else None)
    g_sketch: Tensor | None = field(init=False, default=None)
    _pending: list[Tensor] = field(init=False, default_factory=list)
    _n_pending: int = field(init=False, default=0)
    #: trace of every row's ``g gᵀ`` that went into the sketch, and the part it dropped
    g_trace: float = field(init=False, default=0.0)
    g_trace_dropped: float = field(init=False, default=0.0)
    #: Σ over compressions of the largest eigenvalue each dropped: a bound on the spectral norm
    #: of ``G·N − F Fᵀ`` (the dropped parts are PSD), i.e. on the curvature any one direction
    #: lost to the sketch
    g_norm_dropped: float = field(init=False, default=0.0)
    #: ``diag(G·N)`` on the whole output, kept exactly once ``G`` is sketched (``out`` floats):
    #: what the sketch drops still counts on the diagonal (:meth:`g_residual_diag`)
    g_diag: Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.kfac_type not in KFAC_TYPES:
            raise ConfigError(f"kfac_type must be one of {KFAC_TYPES}, got {self.kfac_type!r}")
        if self.dense_limit < 1 or self.g_rank < 1:
            raise ConfigError(
                f"dense_limit and g_rank must be at least 1, got {self.dense_limit}, {self.g_rank}"
            )
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

    def _grow_support(self, new: Tensor) -> None:
        """``new``: the sorted union of the support and this batch's rows."""
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
        if self.g_sketch is None and self.support.numel() < self.out_dim:
            rows = torch.nonzero((flat != 0).any(0)).flatten().cpu()
            if rows.numel() == 0:
                return
            grown = torch.unique(torch.cat([self.support, rows]))
            if grown.numel() > self.dense_limit:
                self._start_sketch()
            else:
                self._grow_support(grown)
        if self.g_sketch is not None:
            self._sketch_rows(flat)
            return
        sub = flat if self.support.numel() == self.out_dim else flat[:, self.support.to(g.device)]
        self.g_sum += (sub.T @ sub).to(self.dtype).cpu()

    def add_output_grad_set(self, gs: Sequence[Tensor]) -> None:
        """The output gradients ``(B, T, out)`` of one batch's backward passes, one per GGN
        vector: the same ``G`` as :meth:`add_output_grads` on each in turn.

        Once ``G`` is sketched, the rows the passes give one position (or one example, for
        ``reduce``) are first replaced by the fewest rows with the same ``Σ g gᵀ``
        (:func:`fewest_rows`). Why: under cloze scoring every position of the head belongs to
        one option, so the C passes give it C multiples of one vector, and the sketch, whose
        updates cost most of the fit, then takes one row instead of C (exact, tested)."""
        if self.g_sketch is None or len(gs) < 2:
            for g in gs:
                self.add_output_grads(g)
            return
        flats = [g.reshape(-1, g.shape[-1]) if self.kfac_type == "expand" else g.sum(1) for g in gs]
        self._sketch_rows(fewest_rows(torch.stack(flats, 1), self.dtype))

    # --- the sketch of a G too wide to store (module doc) ----------------------------------

    def _start_sketch(self) -> None:
        """Carry the dense ``G`` gathered so far over into a sketch on the whole output."""
        vals, vecs = torch.linalg.eigh((self.g_sum + self.g_sum.T) / 2)
        keep = vals.flip(0)[: self.g_rank].clamp_min(0.0)
        sketch = torch.zeros(self.out_dim, keep.numel(), dtype=self.dtype)
        sketch[self.support] = vecs.flip(1)[:, : keep.numel()] * keep.sqrt()
        self.g_sketch = sketch
        self.g_diag = torch.zeros(self.out_dim, dtype=self.dtype)
        self.g_diag[self.support] = torch.diagonal(self.g_sum).clamp_min(0.0)
        self.g_trace = float(vals.clamp_min(0.0).sum())
        self.g_trace_dropped = self.g_trace - float(keep.sum())
        dropped = vals.flip(0)[self.g_rank :]
        self.g_norm_dropped = float(dropped.max().clamp_min(0.0)) if dropped.numel() else 0.0
        self.support = torch.arange(self.out_dim)
        self.g_sum = torch.zeros(0, 0, dtype=self.dtype)

    def _sketch_rows(self, flat: Tensor) -> None:
        rows = flat[(flat != 0).any(1)].to(self.dtype).cpu()  # unread positions add nothing
        if rows.shape[0] == 0:
            return
        self._pending.append(rows)
        self._n_pending += rows.shape[0]
        squares = rows.pow(2).sum(0)
        self.g_diag += squares
        self.g_trace += float(squares.sum())
        if self._n_pending >= self.g_rank:
            self._compress()

    def _compress(self) -> None:
        """``F`` := the top ``g_rank`` directions of ``[Fᵀ; pending rows]``: with ``M`` that
        stack, ``M Mᵀ = U S² Uᵀ`` and ``Mᵀ U_k = V_k S_k``, so ``F Fᵀ`` is the best rank-k part
        of ``Mᵀ M`` (= the old ``F Fᵀ`` plus the new rows' ``Σ g gᵀ``)."""
        if self.g_sketch is None or not self._pending:
            return
        stack = torch.cat([self.g_sketch.T, *self._pending])
        self._pending, self._n_pending = [], 0
        vals, vecs = torch.linalg.eigh(stack @ stack.T)
        vals, vecs = vals.flip(0), vecs.flip(1)
        self.g_trace_dropped += float(vals[self.g_rank :].clamp_min(0.0).sum())
        if vals.numel() > self.g_rank:
            self.g_norm_dropped += float(vals[self.g_rank].clamp_min(0.0))
        # directions at rounding level are not directions of the data: keep the numerical rank
        rank = int((vals[: self.g_rank] > _rank_tolerance(vals, stack.shape)).sum())
        self.g_sketch = stack.T @ vecs[:, :rank]

    @property
    def g_kept(self) -> float | None:
        """The share of ``G``'s trace its sketch keeps (None: ``G`` is dense, all of it)."""
        if self.g_sketch is None:
            return None
        self._compress()
        return 1.0 - self.g_trace_dropped / self.g_trace if self.g_trace > 0 else 1.0

    def g_eig(self, n_data: int) -> tuple[Tensor, Tensor] | None:
        """Eigenpairs of ``G`` (largest first, on the whole output) when it is sketched; None
        when it is dense (``g_sum`` on ``support``)."""
        if self.g_sketch is None:
            return None
        self._compress()
        # F = V S up to rounding; the small eigenproblem of FᵀF gives V orthonormal exactly
        vals, w = torch.linalg.eigh(self.g_sketch.T @ self.g_sketch)
        vals, w = vals.flip(0), w.flip(1)
        keep = vals > _rank_tolerance(vals, self.g_sketch.shape)
        vals, w = vals[keep], w[:, keep]
        return vals / max(n_data, 1), (self.g_sketch @ w) / vals.sqrt()

    def g_residual_diag(self, n_data: int, vals: Tensor, vecs: Tensor) -> Tensor | None:
        """``diag(G − Q diag(vals) Qᵀ)`` on the whole output for the eigenpairs a posterior
        kept of a sketched ``G`` (None when ``G`` is dense): the curvature of each output
        coordinate that the kept eigenpairs miss. Clamped at 0 (the residual is PSD, so its
        diagonal is nonnegative up to rounding).

        Why: under cloze scoring the head's output gradient at a token is ``e_y − p`` (target
        token minus the model's softmax), so ``G`` is a diagonal of target-token counts plus
        parts along the softmaxes. The diagonal part has as many directions as distinct target
        tokens, far beyond any sketch's rank, and a sketch drops most of them; their curvature
        then falls back to the prior (``results/laplace_variance/``). ``G``'s diagonal costs
        ``out`` floats to keep exactly, and keeping the residual's diagonal gives every
        coordinate back the curvature the sketch missed there."""
        if self.g_sketch is None or self.g_diag is None:
            return None
        kept = (vecs.pow(2) * vals[None, :]).sum(1)
        return (self.g_diag / max(n_data, 1) - kept).clamp_min(0.0)
