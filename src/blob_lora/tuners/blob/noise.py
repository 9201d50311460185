"""The one noise path of BLoB: the hidden LoRA activation ``A x`` with ``A ~ q(A)``.

Every BLoB layer type (fp32/bf16 ``nn.Linear``, 8-bit, 4-bit) calls ``sample_lora_hidden``; only
the base-layer call differs between them. The returned tensor has the rank ``r`` as its last
dimension, so noise never touches the (large) output dimension: LoRA's own ``B`` matmul is run
once on ``M x + noise``.

Modes (see the method doc, section 2):

* ``token``: Flipout with signs drawn per token, the authors' scheme. A custom autograd function
  regenerates the input signs from a seed in backward instead of storing them (on accelerators;
  on the CPU it keeps them as int8, where drawing them again costs more than the memory).
* ``sequence``: Flipout with signs per sequence, i.e. a per-sequence weight
  ``A_b = M + t_b (Omega . E) r_b`` applied with one batched matmul (``B x r x in`` extra memory).
* ``shared``: one sample ``M + Omega . E`` for the whole batch, folded into the mean matmul.
* ``independent``: an independent ``E_b`` per sequence; used when several weight samples of the
  same example are folded into one batch at prediction, where Flipout's shared magnitudes would
  correlate the samples. One coherent weight sample per sequence: ``--eval-noise sequence``.
* ``independent-token``: ``token`` Flipout (signs per token) on an independent ``E_b`` per
  sequence: the authors' evaluation noise (``--eval-noise token``). They draw N samples as N
  forward passes, each with one ``E`` for the batch and signs per token; here the N copies of an
  example share one folded forward, so each sequence gets its own ``E_b``. Every example's N
  samples are then distributed exactly as the authors' (only examples of one batch, which never
  enter the same predictive, are no longer coupled through a shared ``E``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NOISE_MODES = ("token", "sequence", "shared", "independent", "independent-token")


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _int8_signs(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform random +-1 int8 entries.

    On the CPU one 64-bit draw gives 64 signs, unpacked bit by bit: the CPU generator draws one
    Mersenne-Twister number per element however small the dtype, so drawing int8 signs one by
    one cost ~9 ns each (token Flipout's input signs were ~7 % of a demo-shape training step,
    ``bench/train_full_step.py --profile``) against ~1.3 ns unpacked. Every bit of a uniform
    64-bit integer is a fair coin, independent of the others. Accelerators keep the one-per-
    element draw: it is a single fast kernel there, the unpacking would be three more.
    """
    if device.type != "cpu":
        return (
            torch.randint(0, 2, shape, device=device, dtype=torch.int8, generator=generator)
            .mul_(2)
            .sub_(1)
        )
    n = math.prod(shape)
    words = torch.randint(
        -(2**63), 2**63 - 1, ((n + 63) // 64,), dtype=torch.int64, generator=generator
    )
    bits = (words.view(torch.uint8).unsqueeze(-1) >> _BIT_SHIFTS).bitwise_and_(1)
    return bits.view(-1)[:n].view(torch.int8).view(shape).mul_(2).sub_(1)


def random_signs(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Uniform random +-1 entries."""
    return _int8_signs(shape, device).to(dtype)


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _signs_from_seed(seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """+-1 int8 signs drawn from a private generator seeded with ``seed`` (reproducible)."""
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return _int8_signs(shape, device, gen)


def _keeps_token_signs(device: torch.device) -> bool:
    """Whether token-mode Flipout keeps its input signs for backward rather than regenerating
    them, and casts them to the activation dtype itself: on the CPU, where drawing them (one
    Mersenne-Twister number per 64 elements, ``_int8_signs``) costs several elementwise passes, 1 byte per
    element is cheap, and an int8 * float product first casts the signs into a temporary. Not
    on accelerators: there the draw is a fast kernel, memory is what is short, and a mixed-dtype
    product casts inside its one kernel (a separate cast would be one more small kernel)."""
    return device.type == "cpu"


class _TokenFlipout(torch.autograd.Function):
    """``((x * r) @ dA.T) * t`` with per-token input signs ``r``.

    On accelerators ``r`` (one sign per token and input feature, as large as ``x``) is not
    stored but regenerated in backward from its seed, so token-mode Flipout saves nothing beyond
    what LoRA's own matmul keeps (``x``): storing ``r`` or ``x * r`` cost the authors'
    implementation 13-26 % peak memory. On the CPU the int8 signs are kept instead (a quarter
    of ``x``'s fp32 bytes): regenerating them was a third of the mode's cost there
    (``_keeps_token_signs``). The signs, and so the result, are the same either way.
    """

    @staticmethod
    def forward(ctx, x, delta_a, seed, t_sign):  # type: ignore[override]
        r_sign = _signs_from_seed(seed, tuple(x.shape), x.device)
        ctx.seed = seed
        if _keeps_token_signs(x.device):
            ctx.save_for_backward(x, delta_a, t_sign, r_sign)
            xr = r_sign.to(x.dtype).mul_(x)  # cast once, multiply in place: no temporaries
        else:
            ctx.save_for_backward(x, delta_a, t_sign, None)
            xr = x * r_sign
        return F.linear(xr, delta_a).mul_(t_sign)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, delta_a, t_sign, r_sign = ctx.saved_tensors
        if r_sign is None:
            r_sign = _signs_from_seed(ctx.seed, tuple(x.shape), x.device)
        else:
            r_sign = r_sign.to(x.dtype)  # CPU: cast once for both products below
        grad_t = grad_out * t_sign
        grad_x = grad_delta = None
        if ctx.needs_input_grad[1]:
            xr = (x * r_sign).reshape(-1, x.shape[-1])
            grad_delta = grad_t.reshape(-1, grad_t.shape[-1]).transpose(0, 1) @ xr
        if ctx.needs_input_grad[0]:
            grad_x = (grad_t @ delta_a).mul_(r_sign)
        return grad_x, grad_delta, None, None


def token_flipout(x: torch.Tensor, delta_a: torch.Tensor, t_sign: torch.Tensor) -> torch.Tensor:
    """The token-mode noise term; the sign seed comes from the global (CPU) RNG."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return _TokenFlipout.apply(x, delta_a, seed, t_sign)


def as_sequences(x: torch.Tensor) -> torch.Tensor:
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
        t_sign = random_signs((*x.shape[:-1], mean.shape[0]), x.device, x.dtype)
        return F.linear(x, mean) + token_flipout(x, delta, t_sign)
    if mode in ("sequence", "independent"):
        seq = as_sequences(x)
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
    if mode == "independent-token":  # prediction only (no custom backward: signs are kept)
        seq = as_sequences(x)
        delta = std * torch.randn((seq.shape[0], *std.shape), device=x.device, dtype=std.dtype)
        r_sign = random_signs(tuple(seq.shape), x.device, x.dtype)
        t_sign = random_signs((*seq.shape[:-1], mean.shape[0]), x.device, x.dtype)
        noise = torch.bmm(seq * r_sign, delta.transpose(1, 2)) * t_sign
        return F.linear(x, mean) + noise.reshape(*x.shape[:-1], mean.shape[0])
    raise ValueError(f"unknown noise mode {mode!r}; expected one of {NOISE_MODES}")
