"""The one noise path of BLoB: the hidden LoRA activation ``A x`` with ``A ~ q(A)``.

Every BLoB layer type (fp32/bf16 ``nn.Linear``, 8-bit, 4-bit) calls ``sample_lora_hidden``; only
the base-layer call differs between them. The returned tensor has the rank ``r`` as its last
dimension, so noise never touches the (large) output dimension: LoRA's own ``B`` matmul is run
once on ``M x + noise``.

Modes (see the method doc, section 2):

* ``token``: Flipout with signs drawn per token, the authors' scheme. A custom autograd function
  keeps the input signs as int8 for backward instead of a float copy of ``x * r``.
* ``sequence``: Flipout with signs per sequence, i.e. a per-sequence weight
  ``A_b = M + t_b (Omega . E) r_b`` applied with one batched matmul (``B x r x in`` extra memory).
* ``shared``: one sample ``M + Omega . E`` for the whole batch, folded into the mean matmul.
* ``independent``: an independent ``E_b`` per sequence; used when several weight samples of the
  same example are folded into one batch at prediction, where Flipout's shared magnitudes would
  correlate the samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NOISE_MODES = ("token", "sequence", "shared", "independent")


def random_signs(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Uniform random +-1 entries."""
    return torch.randint(0, 2, shape, device=device, dtype=torch.int8).mul_(2).sub_(1).to(dtype)


class _TokenFlipout(torch.autograd.Function):
    """``((x * r) @ dA.T) * t`` saving ``r`` as int8 instead of the float product ``x * r``."""

    @staticmethod
    def forward(ctx, x, delta_a, r_sign, t_sign):  # type: ignore[override]
        ctx.save_for_backward(x, delta_a, r_sign, t_sign)
        return F.linear(x * r_sign, delta_a) * t_sign

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, delta_a, r_sign, t_sign = ctx.saved_tensors
        grad_t = grad_out * t_sign
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_t @ delta_a) * r_sign
        if ctx.needs_input_grad[1]:
            xr = (x * r_sign).reshape(-1, x.shape[-1])
            grad_delta = grad_t.reshape(-1, grad_t.shape[-1]).transpose(0, 1) @ xr
        return grad_x, grad_delta, None, None


def _as_sequences(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as (batch, positions, features); a 2-D input is one position per row."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def sample_lora_hidden(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, mode: str
) -> torch.Tensor:
    """Return ``A x`` for one draw of ``A ~ N(mean, std**2)`` under ``mode``.

    ``x`` is (..., in), ``mean`` and ``std`` are (r, in); the result is (..., r). For a fixed
    input every mode has the same marginal mean ``M x`` and variance ``sum_j std_kj**2 x_j**2``.
    """
    if mode == "shared":
        return F.linear(x, mean + std * torch.randn_like(std))
    if mode == "token":
        delta = std * torch.randn_like(std)
        r_sign = random_signs(tuple(x.shape), x.device, torch.int8)
        t_sign = random_signs((*x.shape[:-1], mean.shape[0]), x.device, x.dtype)
        return F.linear(x, mean) + _TokenFlipout.apply(x, delta, r_sign, t_sign)
    if mode in ("sequence", "independent"):
        seq = _as_sequences(x)
        batch = seq.shape[0]
        if mode == "sequence":
            delta = std * torch.randn_like(std)
            r_sign = random_signs((batch, 1, mean.shape[1]), x.device, x.dtype)
            t_sign = random_signs((batch, mean.shape[0], 1), x.device, x.dtype)
            weight = mean + t_sign * delta * r_sign
        else:
            weight = mean + std * torch.randn((batch, *std.shape), device=x.device, dtype=std.dtype)
        out = torch.bmm(seq, weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], mean.shape[0])
    raise ValueError(f"unknown noise mode {mode!r}; expected one of {NOISE_MODES}")
