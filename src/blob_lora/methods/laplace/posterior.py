"""One layer's Kronecker-factored Laplace posterior in the factors' eigenbases.

Why: with ``A = Q_A Λ_A Q_Aᵀ`` and ``G = Q_G Λ_G Q_Gᵀ`` the posterior precision of a layer,
``P = (N/T)·(A ⊗ G) + δ·I``, is diagonal in the basis ``Q_A ⊗ Q_G`` with eigenvalues
``(N/T)·λ_A,i·λ_G,j + δ``. Its inverse, log determinant and the Jacobian-sandwich ``J P⁻¹ Jᵀ``
then cost only projections onto the two small bases, for any prior precision ``δ``.

Truncation and row support: the kept eigenpairs span a subspace ``K`` of the layer's
``in·out`` parameters (``k_A·k_G`` directions). Outside ``K`` the curvature is taken as zero,
so the posterior there is the prior ``N(0, δ⁻¹ I)``. This covers (i) eigenpairs dropped by a
rank limit and (ii) the output rows outside the gradient support (e.g. all non-option rows of
``lm_head``'s ``lora_B``). Those directions enter

* the log determinant as the closed-form term ``(in·out − k_A·k_G)·log δ``;
* the predictive as ``δ⁻¹·‖J_⊥‖²``, with ``J_⊥`` the part of the Jacobian outside ``K``
  (zero when the Jacobian lies in the support and no eigenpair was dropped, the usual case).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from blob_lora.methods.laplace.kfac import KronAccumulator

FIELDS = ("dims", "A_vals", "A_vecs", "G_vals", "G_vecs", "G_support")


def _top_eig(mat: Tensor, max_rank: int | None) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric PSD matrix, largest first, negatives (rounding) clamped to 0."""
    if mat.numel() == 0:
        return mat.new_zeros(0), mat.new_zeros(mat.shape[0], 0)
    vals, vecs = torch.linalg.eigh((mat + mat.T) / 2)
    vals, vecs = vals.flip(0).clamp_min(0.0), vecs.flip(1)
    if max_rank is not None and max_rank < vals.numel():
        vals, vecs = vals[:max_rank], vecs[:, :max_rank]
    return vals.contiguous(), vecs.contiguous()


@dataclass
class KronLayer:
    """Eigen-decomposed factors ``A`` (``in × in``) and ``G`` (on ``support``, ``s × s``)."""

    in_dim: int
    out_dim: int
    a_vals: Tensor
    a_vecs: Tensor
    g_vals: Tensor
    g_vecs: Tensor
    g_support: Tensor

    @classmethod
    def from_accumulator(
        cls,
        acc: KronAccumulator,
        n_data: int,
        max_rank: int | None = None,
        a_eig: tuple[Tensor, Tensor] | None = None,
    ) -> KronLayer:
        """``a_eig``: eigenpairs of an identical ``A`` already decomposed for another layer."""
        if a_eig is None:
            a_vals, a_vecs = _top_eig(acc.a_sum / max(acc.a_count, 1.0), max_rank)
        else:
            a_vals, a_vecs = a_eig
        sketched = acc.g_eig(n_data)
        if sketched is None:
            g_vals, g_vecs = _top_eig(acc.g_sum / max(n_data, 1), max_rank)
        else:  # already the leading eigenpairs, largest first
            g_vals, g_vecs = (t[..., :max_rank].contiguous() for t in sketched)
        return cls(acc.in_dim, acc.out_dim, a_vals, a_vecs, g_vals, g_vecs, acc.support.clone())

    @property
    def a_eig(self) -> tuple[Tensor, Tensor]:
        return self.a_vals, self.a_vecs

    @property
    def n_params(self) -> int:
        return self.in_dim * self.out_dim

    @property
    def n_kept(self) -> int:
        return self.a_vals.numel() * self.g_vals.numel()

    def curvature_eigvals(self, scale: float) -> Tensor:
        """``scale·λ_G,j·λ_A,i`` as a ``(k_G, k_A)`` grid (``scale`` = N / temperature)."""
        return scale * self.g_vals[:, None] * self.a_vals[None, :]

    def log_det_precision(self, scale: float, prior_precision: float) -> float:
        kept = torch.log(self.curvature_eigvals(scale) + prior_precision).sum().item()
        return kept + (self.n_params - self.n_kept) * float(
            torch.log(torch.tensor(prior_precision))
        )

    def project(self, a: Tensor, g: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """One option's Jacobian for this layer, in the posterior eigenbasis.

        ``a``: ``(B, T, in)`` layer inputs; ``g``: ``(B, T, out)`` output gradients of that
        option's logit, so ``J[b] = Σ_t g[b, t] a[b, t]ᵀ`` (``out × in``). Returns
        ``Q_Gᵀ J Q_A`` ``(B, k_G, k_A)`` and the part of ``J`` outside the kept subspace as
        ``(rows, (B, len(rows), in))``, or None when that part is zero (the usual case).
        Projecting per option keeps only ``B × n_params`` numbers alive, not the output
        gradients of every option and position.
        """
        dt = self.a_vecs.dtype
        a, g = a.to(dt), g.to(dt)
        dev = a.device
        support = self.g_support.to(dev)
        a_vecs, g_vecs = self.a_vecs.to(dev), self.g_vecs.to(dev)
        j_proj = torch.einsum("btg,bta->bga", g[..., support] @ g_vecs, a @ a_vecs)
        in_support = torch.zeros(self.out_dim, dtype=torch.bool, device=dev)
        in_support[support] = True
        used = (g != 0).flatten(0, -2).any(0)
        complete = self.a_vals.numel() == self.in_dim and self.g_vals.numel() == support.numel()
        if complete and not bool((used & ~in_support).any()):
            return j_proj, None
        rows = torch.nonzero(used | in_support).flatten()
        j_rows = torch.einsum("btu,bti->bui", g[..., rows], a)
        g_vecs_rows = torch.zeros(rows.numel(), g_vecs.shape[1], dtype=dt, device=dev)
        g_vecs_rows[torch.searchsorted(rows, support)] = g_vecs
        back = torch.einsum("ug,bga,ia->bui", g_vecs_rows, j_proj, a_vecs)
        return j_proj, (rows, j_rows - back)

    def logit_cov(
        self,
        parts: list[tuple[Tensor, tuple[Tensor, Tensor] | None]],
        scale: float,
        prior_precision: float,
    ) -> Tensor:
        """``J Σ Jᵀ`` ``(B, C, C)`` from the C options' :meth:`project` results."""
        j_proj = torch.stack([p[0] for p in parts], dim=1)  # (B, C, kG, kA)
        dev = j_proj.device
        var = 1.0 / (self.curvature_eigvals(scale).to(dev) + prior_precision)
        cov = torch.einsum("bcga,bdga,ga->bcd", j_proj, j_proj, var)
        resids = [p[1] for p in parts]
        present = [r for r in resids if r is not None]
        if not present:
            return cov
        # Part of the Jacobian outside the kept subspace: prior variance 1/δ there.
        rows = torch.unique(torch.cat([r[0] for r in present]))
        full = j_proj.new_zeros(j_proj.shape[0], len(parts), rows.numel(), self.in_dim)
        for c, r in enumerate(resids):
            if r is not None:
                full[:, c, torch.searchsorted(rows, r[0])] = r[1]
        return cov + torch.einsum("bcui,bdui->bcd", full, full) / prior_precision

    def to_tensors(self) -> dict[str, Tensor]:
        return {
            "dims": torch.tensor([self.in_dim, self.out_dim], dtype=torch.long),
            "A_vals": self.a_vals.contiguous().clone(),
            "A_vecs": self.a_vecs.contiguous().clone(),
            "G_vals": self.g_vals.contiguous().clone(),
            "G_vecs": self.g_vecs.contiguous().clone(),
            "G_support": self.g_support.contiguous().clone(),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> KronLayer:
        in_dim, out_dim = (int(x) for x in t["dims"].tolist())
        return cls(
            in_dim,
            out_dim,
            t["A_vals"].clone(),
            t["A_vecs"].clone(),
            t["G_vals"].clone(),
            t["G_vecs"].clone(),
            t["G_support"].to(torch.long).clone(),
        )
