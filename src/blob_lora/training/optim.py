"""Optimisation of BLoB's mean, ``B`` and std (method doc, section 3).

Two modes, both on one backward pass of the NLL per micro-batch:

* ``paper``: AdamW steps the mean and ``B`` on the NLL gradient; then plain SGD at ``kl_lr``
  steps every trainable tensor on the gradient of ``pi * KL`` (closed form, no activations), and
  the std parameters on NLL + KL (they are in no other optimiser). This is the authors' update,
  without their second backward through the network.
* ``single``: one AdamW on ``NLL + pi * KL`` with two parameter groups (mean/``B`` at ``lr``,
  std at ``std_lr``).

Both use linear warmup followed by linear decay to zero. ``paper`` uses the authors' schedule
(``get_linear_schedule_with_warmup`` of their code, on AdamW and the KL SGD alike): the factor
at optimiser step ``s`` (0-based) is ``s / W`` during warmup with ``W = warmup_ratio * total``
unrounded, so the first update is taken at lr 0. ``single`` keeps this project's original
``(s + 1) / W`` (``W`` rounded), whose first update already moves the weights.

Under fp16 mixed precision (a ``GradScaler``, e.g. the one Accelerate attaches to the optimisers
it prepares) the NLL gradients carry the loss scale; ``Updater`` enters the KL gradient of the
``paper`` mode at the same scale (see ``Updater._paper_step_scaled``). ``single`` mode needs
nothing: ``pi * KL`` is part of the scaled loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.profiler import record_function

from blob_lora.methods.lora import decay_is_inert
from blob_lora.utils.errors import ConfigError

OPTIMIZER_MODES = ("paper", "single")


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = total_steps - step
        return max(0.0, remaining / max(1, total_steps - warmup_steps))

    return factor


def authors_warmup_decay(total_steps: int, warmup_steps: float) -> Callable[[int], float]:
    """The authors' factor: ``s / W`` while ``s < W`` (0 at the first step), then linear decay
    ``(total - s) / (total - W)`` to zero; ``W`` may be fractional (``ratio * total``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step) / max(1.0, warmup_steps)
        return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup_steps))

    return factor


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(mean and ``B`` and every other trainable tensor, std parameters)."""
    point, std = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (std if "lora_A_rho" in name else point).append(param)
    return point, std


@dataclass
class Updater:
    """Owns the optimisers and schedulers and applies one update per optimiser step.

    ``scaler``: the fp16 ``GradScaler`` whose scale the accumulated gradients carry. Left
    ``None``, the one Accelerate attached to the prepared optimisers (``AcceleratedOptimizer.
    scaler``) is used; without either (fp32, bf16) the update is the plain one.
    """

    mode: str
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[LambdaLR]
    point_params: list[nn.Parameter]
    std_params: list[nn.Parameter]
    scaler: Any = None

    def grad_scaler(self) -> Any:
        """The enabled ``GradScaler`` the gradients are scaled by, or ``None``."""
        scaler = self.scaler
        if scaler is None:
            scaler = getattr(self.optimizers[0], "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler

    def step(self, kl_fn: Callable[[], torch.Tensor] | None, pi: float) -> torch.Tensor | None:
        """Apply the update after the NLL gradients of one optimiser step are accumulated.

        In ``single`` mode the caller has already added ``pi * KL`` to the loss, so ``kl_fn``
        is only used in ``paper`` mode.
        """
        kl = None
        if self.mode == "single" or kl_fn is None:
            for opt in self.optimizers:
                opt.step()
        elif (scaler := self.grad_scaler()) is not None:
            kl = self._paper_step_scaled(scaler, kl_fn, pi)
        else:
            adamw, sgd = self.optimizers
            adamw.step()
            for p in self.point_params:
                p.grad = None  # SGD sees only the KL gradient on mean and B ...
            with record_function("train.update.kl"):
                kl = kl_fn()
                self._add_kl_gradient(pi * kl)  # std: NLL + KL
            sgd.step()
            kl = kl.detach()
        for sched in self.schedulers:
            sched.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return kl

    def _add_kl_gradient(self, weighted_kl: torch.Tensor, scale: float | None = None) -> None:
        """Add ``scale * grad(weighted_kl)`` to every mean, ``B`` and std gradient.

        ``autograd.grad``, not ``backward``: no DDP gradient hooks fire for this closed-form
        term (it is identical on every process and needs no all-reduce).
        """
        params = self.point_params + self.std_params
        grads = torch.autograd.grad(weighted_kl, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                if scale is not None:
                    g = g * scale
                p.grad = g if p.grad is None else p.grad + g

    def _paper_step_scaled(
        self, scaler: Any, kl_fn: Callable[[], torch.Tensor], pi: float
    ) -> torch.Tensor:
        """The ``paper`` update when the accumulated gradients carry an fp16 loss scale ``S``.

        ``scaler.scale(loss).backward()`` (``accelerator.backward``) left ``S * grad(NLL)`` in
        every ``.grad``; the KL gradient comes from ``autograd.grad`` and is unscaled. Added as
        it is, the unscaling in the optimiser step would divide it by ``S`` too (by 65536 at
        the default scale: no KL, and the std, stepped only by that SGD, barely moves). So the
        KL gradient is entered *scaled*, ``S * grad(pi * KL)``, and both optimisers are driven
        by the scaler the way PyTorch prescribes for several optimisers in one iteration:

        1. ``scaler.step(adamw)``: unscales the mean/``B`` gradients, skips AdamW if they hold
           an inf/NaN;
        2. the mean/``B`` gradients are replaced by ``S * grad(pi * KL)``, the std gradients
           (``S * grad(NLL)``) get ``S * grad(pi * KL)`` added;
        3. ``scaler.step(sgd)``: unscales by the same ``S`` (the scale cannot change before
           ``update``), skips the SGD if a std NLL gradient overflowed;
        4. ``scaler.update()`` once: the scale backs off if either step was skipped, and counts
           one good iteration otherwise.

        Each optimiser decides on its own gradients (PyTorch's multi-optimiser semantics): an
        overflow in the mean/``B`` gradients skips AdamW, while the finite std NLL gradients
        and the KL still take their SGD step. The inner optimisers are stepped directly, not
        through ``AcceleratedOptimizer.step``, because that calls ``scaler.update()`` after each
        optimiser: between the two steps the scale could change under gradients still scaled
        by the old one, and the growth counter would advance twice per iteration (their
        ``step_was_skipped`` is therefore not maintained; the training loop does not read it).
        With a power-of-two scale (GradScaler's default and every value it moves to) multiplying
        and dividing the KL gradient by ``S`` adds no rounding.
        """
        adamw, sgd = self.optimizers
        scale = scaler.get_scale()  # the S of this iteration's gradients (update() comes last)
        _scaler_step(scaler, adamw)
        for p in self.point_params:
            p.grad = None  # SGD sees only the KL gradient on mean and B ...
        kl = kl_fn()
        self._add_kl_gradient(pi * kl, scale)  # std: S * (NLL + KL)
        _scaler_step(scaler, sgd)
        scaler.update()
        return kl.detach()

    def state_dict(self) -> dict:
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ConfigError("checkpoint was written with a different optimizer mode")
        for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)
        for sched, sd in zip(self.schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(sd)


def _scaler_step(scaler: Any, opt: torch.optim.Optimizer) -> None:
    """``scaler.step`` on the torch optimiser inside Accelerate's wrapper(s), if it has work.

    (GradScaler refuses an optimiser none of whose parameters has a gradient.)
    """
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    if any(p.grad is not None for group in opt.param_groups for p in group["params"]):
        scaler.step(opt)


def warn_if_decay_rounds_away(
    params: Sequence[nn.Parameter], lr: float, weight_decay: float
) -> None:
    """Warn when AdamW's decoupled decay cannot change a weight at all.

    AdamW multiplies each weight by ``1 - lr * weight_decay``, cast to the weight's dtype. Up to
    a quarter of the dtype's epsilon (2^-25 in fp32; ``methods.lora.decay_is_inert``) that
    factor *is* 1.0, so the run is bitwise plain LoRA: the paper's MAP baseline (wd 1e-5 at lr
    1e-4, or our 1e-3) is such a case. Users who want a prior that acts need
    ``lr * weight_decay`` above the threshold.
    """
    if weight_decay <= 0:
        return
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    inert = sorted(str(d) for d in dtypes if decay_is_inert(lr, weight_decay, d))
    if inert:
        warnings.warn(
            f"weight decay {weight_decay:g} at peak lr {lr:g} is a no-op for {', '.join(inert)} "
            f"weights: AdamW's factor 1 - {lr * weight_decay:.1e} rounds to 1.0, so training "
            "is identical to weight decay 0",
            UserWarning,
            stacklevel=3,
        )


def build_updater(
    model: nn.Module,
    *,
    mode: str,
    bayesian: bool,
    lr: float,
    total_steps: int,
    warmup_ratio: float = 0.06,
    weight_decay: float = 0.0,
    kl_lr: float = 0.01,
    std_lr: float | None = None,
    adam_eps: float = 1e-6,
    reshape: Callable[[Callable[[int], float]], Callable[[int], float]] | None = None,
) -> Updater:
    """The optimisers and schedules of a run; ``reshape`` turns the run's learning-rate factor
    into the one the method uses (``Method.lr_factor``; SWAG holds it constant while it
    collects)."""
    if mode not in OPTIMIZER_MODES:
        raise ConfigError(f"optimizer must be one of {OPTIMIZER_MODES}, got {mode!r}")
    point, std = split_parameters(model)
    if not point:
        raise ConfigError("the model has no trainable parameters")
    warn_if_decay_rounds_away(point + std, lr, weight_decay)
    if mode == "paper":  # every method: the authors' baselines share BLoB's schedule
        factor = authors_warmup_decay(total_steps, warmup_ratio * total_steps)
    else:
        factor = linear_warmup_decay(total_steps, int(round(warmup_ratio * total_steps)))
    if reshape is not None:
        factor = reshape(factor)
    if not bayesian or not std:
        opt = torch.optim.AdamW(point + std, lr=lr, eps=adam_eps, weight_decay=weight_decay)
        return Updater("single", [opt], [LambdaLR(opt, factor)], point, std)
    if mode == "single":
        opt = torch.optim.AdamW(
            [
                {"params": point, "lr": lr},
                {"params": std, "lr": std_lr if std_lr is not None else lr},
            ],
            eps=adam_eps,
            weight_decay=weight_decay,
        )
        return Updater("single", [opt], [LambdaLR(opt, factor)], point, std)
    adamw = torch.optim.AdamW(point, lr=lr, eps=adam_eps, weight_decay=weight_decay)
    sgd = torch.optim.SGD(point + std, lr=kl_lr)
    return Updater(
        "paper", [adamw, sgd], [LambdaLR(adamw, factor), LambdaLR(sgd, factor)], point, std
    )
