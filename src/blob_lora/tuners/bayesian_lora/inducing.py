"""The inducing-weight posterior of one LoRA factor (Bayesian-LoRA, after Ritter et al. 2021).

A factor ``W`` (``d_out x d_in``: LoRA's ``A`` is ``r x in``, its ``B`` is ``out x r``) is
augmented with a small inducing matrix ``U`` (``p x q``, 9 x 9 by default) so that the block
matrix ``[[W, U_c], [U_r, U]]`` is matrix-normal with zero mean, row covariance
``[[I, Z_r^T], [Z_r, K_r]]`` and column covariance ``[[I, Z_c^T], [Z_c, K_c]]``, where
``K_r = Z_r Z_r^T + D_r^2`` (``p x p``) and ``K_c = Z_c Z_c^T + D_c^2`` (``q x q``) with learned
``Z_r`` (``p x d_out``), ``Z_c`` (``q x d_in``) and positive diagonals ``D_r``, ``D_c``. So

* the prior on ``U`` is Kronecker-factored: ``p(vec U) = N(0, K_c (x) K_r)``;
* ``p(W | U) = N(M_W(U), Sigma_W)`` with ``M_W(U) = Z_r^T K_r^-1 U K_c^-1 Z_c`` and
  ``Sigma_W = I - (Z_r^T K_r^-1 Z_r) (x) (Z_c^T K_c^-1 Z_c)``;
* every element of ``W`` is marginally ``N(0, 1)``, scaled by ``prior_std`` (the prior on W).

The variational posterior is ``q(W, U) = q(U) q_lambda(W | U)``: ``U = L_r V L_c^T`` is
whitened (``L`` the Cholesky factors of ``K``), ``q(V) = N(m, diag(s^2))`` (``p(V) = N(0, I)``),
and ``q_lambda(W | U)`` has the mean of ``p(W | U)`` and the covariance ``lambda^2 Sigma_W``.
Hence the ELBO's KL is ``KL(q(V) || N(0, I)) + d_out d_in (lambda^2 / 2 - log lambda - 1/2)``.

A sample of ``W`` is ``prior_std * (M_W(U) + lambda * noise)`` where ``noise ~ N(0, Sigma_W)`` is
drawn by Matheron's rule (a joint sample of the augmented matrix, moved onto the conditional):
``Sigma_W`` is a difference of Kronecker products and has no cheap square root.

With ``lambda -> 0`` and ``s -> 0`` the sample is the deterministic ``prior_std * M_W(L_r m
L_c^T)``, which is also the posterior mean of ``W`` (``M_W`` is linear in ``U``): a plain LoRA
factor. That is the limit in which Bayesian-LoRA is plain LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from blob_lora.tuners.bayesian_lora.config import BayesianLoraConfig


def inverse_softplus(y: float) -> float:
    """``x`` with ``softplus(x) = y`` (``y > 0``)."""
    return y + math.log(-math.expm1(-y))


def jittered_cholesky(m: torch.Tensor, jitter: float) -> torch.Tensor:
    """Lower Cholesky factor of ``m + jitter * mean(diag m) * I`` (``m`` symmetric PSD, or a
    stack of such matrices, each factorised with its own jitter).

    ``torch.linalg.cholesky_ex``, not ``torch.linalg.cholesky``: the latter reads its status
    back to the host to raise, a wait for the device queue at every call (on an H200: 0.46
    against 0.56 ms per call with its backward,
    ``bench/inducing_factors.py``). A factorisation that fails (a matrix not positive definite
    even with the jitter) gives a factor of NaN instead, so the loss turns non-finite and
    training stops with the trainer's error for that.
    """
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    scale = jitter * m.detach().diagonal(dim1=-2, dim2=-1).mean(-1)  # one per matrix
    factor, info = torch.linalg.cholesky_ex(m + scale[..., None, None] * eye)
    return torch.where((info == 0)[..., None, None], factor, torch.nan)


@contextmanager
def pinned(posteriors: Iterable[InducingWeight]) -> Iterator[None]:
    """:meth:`InducingWeight.pinned_factors` of every posterior in ``posteriors``, for the
    length of the block (a prediction pass over the whole model)."""
    with ExitStack() as stack:
        for posterior in posteriors:
            stack.enter_context(posterior.pinned_factors())
        yield


class InducingWeight(nn.Module):
    """``q(W)`` of one ``d_out x d_in`` factor through its inducing matrix (see module doc).

    Parameters (all trainable, names free of ``lora_`` so that PEFT's key rewriting keeps them
    whole): ``z_row``, ``z_col``, ``d_row_raw``, ``d_col_raw`` (the prior of ``U``), ``u_mean``,
    ``u_std_raw`` (``q(V)``) and ``lamda_raw``. The small factorisations run in float64.
    """

    def __init__(self, d_out: int, d_in: int, config: BayesianLoraConfig) -> None:
        super().__init__()
        rows, cols = config.inducing_rows, config.inducing_cols
        self.d_out, self.d_in = d_out, d_in
        self.prior_std = (
            config.prior_std / math.sqrt(d_in) if config.sqrt_width_scaling else (config.prior_std)
        )
        self.max_lamda = config.max_lamda
        self.max_u_std = config.max_u_std
        self.jitter = config.jitter
        self.z_row = nn.Parameter(torch.randn(rows, d_out) * rows**-0.5)
        self.z_col = nn.Parameter(torch.randn(cols, d_in) * cols**-0.5)
        self.d_row_raw = nn.Parameter(torch.full((rows,), inverse_softplus(config.init_d)))
        self.d_col_raw = nn.Parameter(torch.full((cols,), inverse_softplus(config.init_d)))
        self.u_mean = nn.Parameter(torch.randn(rows, cols))
        self.u_std_raw = nn.Parameter(torch.full((rows, cols), inverse_softplus(config.init_u_std)))
        self.lamda_raw = nn.Parameter(torch.full((1,), inverse_softplus(config.init_lamda)))
        #: the factorisations held by :meth:`pinned_factors` (those of :meth:`_factors`)
        self._pinned: tuple[torch.Tensor, ...] | None = None

    # --- constrained parameters -------------------------------------------------------------

    def lamda(self) -> torch.Tensor:
        """``lambda`` (shape (1,)), in ``(0, max_lamda]``."""
        return F.softplus(self.lamda_raw.float()).clamp(max=self.max_lamda)

    def u_std(self) -> torch.Tensor:
        """The std ``s`` of the whitened ``q(V)``, in ``(0, max_u_std]``."""
        return F.softplus(self.u_std_raw.float()).clamp(max=self.max_u_std)

    # --- the prior's structure --------------------------------------------------------------

    def _factors(self) -> tuple[torch.Tensor, ...]:
        """``(T_r, T_c, L_r, L_c, L_zr, L_zc)``, float32, computed in float64: ``T_r = Z_r^T
        K_r^-1`` (d_out x p), ``T_c = K_c^-1 Z_c`` (q x d_in), the Cholesky factors of ``K_r``
        and ``K_c``, and those of ``Z_r Z_r^T`` and ``Z_c Z_c^T`` (jittered) that Matheron's
        rule in :meth:`sample_weight` needs. The ones pinned by :meth:`pinned_factors` when
        autograd is off."""
        if self._pinned is not None and not torch.is_grad_enabled():
            return self._pinned
        return self._compute_factors()

    @contextmanager
    def pinned_factors(self) -> Iterator[None]:
        """Within the block, draws with autograd off reuse the factorisations of the prior,
        computed once on entering it; the parameters must not change inside (a prediction pass
        over a dataset). Without it every batch factorises again: ~2/3 of a draw's operations
        without autograd, small ones whose launch latency is their cost on a GPU
        (``bench/inducing_factors.py``). Draws with autograd on compute their own."""
        previous = self._pinned
        with torch.no_grad():
            self._pinned = self._compute_factors()
        try:
            yield
        finally:
            self._pinned = previous

    def _compute_factors(self) -> tuple[torch.Tensor, ...]:
        """:meth:`_factors`, computed. The four 9 x 9 factorisations run as one batched call
        where ``p == q`` (the default), each small operation being a kernel launch on a GPU
        (``bench/inducing_factors.py``); the factors are those of four separate calls."""
        z_row, z_col = self.z_row.double(), self.z_col.double()
        zz_row, zz_col = z_row @ z_row.T, z_col @ z_col.T
        k_row = zz_row + torch.diag(F.softplus(self.d_row_raw.double()).square())
        k_col = zz_col + torch.diag(F.softplus(self.d_col_raw.double()).square())
        if k_row.shape == k_col.shape:
            stacked = jittered_cholesky(torch.stack([k_row, k_col, zz_row, zz_col]), self.jitter)
            l_row, l_col, l_zr, l_zc = stacked.unbind(0)
        else:
            l_row, l_col = (jittered_cholesky(k, self.jitter) for k in (k_row, k_col))
            l_zr, l_zc = (jittered_cholesky(k, self.jitter) for k in (zz_row, zz_col))
        t_row = torch.cholesky_solve(z_row, l_row).T
        t_col = torch.cholesky_solve(z_col, l_col)
        return tuple(t.float() for t in (t_row, t_col, l_row, l_col, l_zr, l_zc))

    def conditional_covariance(self) -> torch.Tensor:
        """``Sigma_W`` as a dense ``(d_out d_in) x (d_out d_in)`` matrix, row-major ``vec(W)``
        (tests and small factors only: it is quadratic in the factor's size)."""
        t_row, t_col, *_ = self._factors()
        row = t_row @ self.z_row.float()  # Z_r^T K_r^-1 Z_r
        col = self.z_col.float().T @ t_col  # Z_c^T K_c^-1 Z_c
        n = self.d_out * self.d_in
        return torch.eye(n, device=row.device) - torch.kron(row, col)

    # --- weights ----------------------------------------------------------------------------

    def mean_weight(self) -> torch.Tensor:
        """The posterior mean of ``W`` (float32): ``prior_std * M_W(L_r m L_c^T)``."""
        t_row, t_col, l_row, l_col, *_ = self._factors()
        u = l_row @ self.u_mean.float() @ l_col.T
        return self.prior_std * (t_row @ u @ t_col)

    def sample_weight(self, n: int | None = None) -> torch.Tensor:
        """One draw of ``W ~ q(W)`` (``d_out x d_in``), or ``n`` independent draws stacked
        (``n x d_out x d_in``); float32, differentiable in every parameter."""
        batch = () if n is None else (n,)
        t_row, t_col, l_row, l_col, l_zr, l_zc = self._factors()
        z_row, z_col = self.z_row.float(), self.z_col.float()
        rows, cols = z_row.shape[0], z_col.shape[0]
        device = z_row.device
        v = self.u_mean.float() + self.u_std() * torch.randn((*batch, rows, cols), device=device)
        u_mean = l_row @ v @ l_col.T  # the mean of W is T_r u_mean T_c
        # Matheron's rule: W = e1 is the W-block of a joint sample of the augmented matrix and
        # u_bar = Z_r e1 Z_c^T + L_zr e2 D_c + D_r e3 L_zc^T + D_r e4 D_c its U-block, where
        # L_zr L_zr^T = Z_r Z_r^T stands in for the (d_out x q) block Z_r E_12 in distribution;
        # e1 - T_r u_bar T_c is then distributed as N(0, Sigma_W).
        e1 = torch.randn((*batch, self.d_out, self.d_in), device=device)
        e2, e3, e4 = torch.randn((3, *batch, rows, cols), device=device)
        d_row = F.softplus(self.d_row_raw.float())
        d_col = F.softplus(self.d_col_raw.float())
        u_bar = (
            z_row @ e1 @ z_col.T
            + l_zr @ e2 * d_col
            + d_row.unsqueeze(-1) * e3 @ l_zc.T
            + d_row.unsqueeze(-1) * e4 * d_col
        )
        # mean + lambda (e1 - T_r u_bar T_c), with the two (d_out x d_in) products of T_r and
        # T_c folded into one and T_c applied first: the draws of a head's B (49,152 x r, one
        # per sequence) are the largest tensors of an evaluation, and each product or pass
        # over them costs (bench/head_rows.py --methods bayesian-lora)
        lam = self.lamda()
        core = self.prior_std * ((u_mean - lam * u_bar) @ t_col)  # (p x d_in): small
        return torch.addcmul(t_row @ core, self.prior_std * lam, e1)

    # --- KL ---------------------------------------------------------------------------------

    def kl(self) -> torch.Tensor:
        """``KL(q(W, U) || p(W, U))`` in float32: the whitened inducing term plus the
        conditional term ``d_out d_in (lambda^2 / 2 - log lambda - 1/2)``."""
        m, s = self.u_mean.float(), self.u_std()
        inducing = 0.5 * (s.square() + m.square() - 1.0).sum() - torch.log(s).sum()
        lam = self.lamda()
        conditional = self.d_out * self.d_in * (0.5 * lam.square() - torch.log(lam) - 0.5)
        return inducing + conditional.sum()
