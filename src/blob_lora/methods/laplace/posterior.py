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

Residual diagonal (a sketched ``G``, :mod:`kfac`): ``G`` may instead be kept as its leading
eigenpairs plus the exact diagonal of the rest, ``G ≈ D + U Λ Uᵀ``. Then no direction falls
back to the prior: per eigenpair ``(λ_A,i, q_i)`` of ``A`` the precision's block is
``Δ_i + c_i U Λ Uᵀ`` with ``c_i = (N/T)·λ_A,i`` and the diagonal ``Δ_i = c_i·D + δ``, whose
inverse and log determinant follow from Woodbury and the determinant lemma through the
``k_G × k_G`` matrix ``K_i = I + c_i Λ^½ Uᵀ Δ_i⁻¹ U Λ^½`` (``O(out·k_G²)`` per ``i`` and
``δ``, cached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from blob_lora.methods.laplace.kfac import KronAccumulator

FIELDS = ("dims", "A_vals", "A_vecs", "G_vals", "G_vecs", "G_support")
#: saved only by fits that kept a residual diagonal (states written before it lack it)
OPTIONAL_FIELDS = ("G_resid",)


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
    """Eigen-decomposed factors ``A`` (``in × in``) and ``G`` (on ``support``, ``s × s``).

    ``g_resid``: the diagonal ``D`` of ``G`` beyond its kept eigenpairs, on the whole output,
    for a sketched ``G`` fitted with a residual diagonal (module doc); empty otherwise."""

    in_dim: int
    out_dim: int
    a_vals: Tensor
    a_vecs: Tensor
    g_vals: Tensor
    g_vecs: Tensor
    g_support: Tensor
    g_resid: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    #: ``(scale, δ)`` -> the Cholesky factors of every ``K_i`` (residual diagonal only)
    _woodbury: dict[tuple[float, float], Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.has_resid and (
            self.g_resid.numel() != self.out_dim or self.g_support.numel() != self.out_dim
        ):
            raise ValueError("a residual diagonal needs G on the whole output")

    @classmethod
    def from_accumulator(
        cls,
        acc: KronAccumulator,
        n_data: int,
        max_rank: int | None = None,
        a_eig: tuple[Tensor, Tensor] | None = None,
        g_residual: bool = False,
    ) -> KronLayer:
        """``a_eig``: eigenpairs of an identical ``A`` already decomposed for another layer.
        ``g_residual``: keep the diagonal of a sketched ``G`` beyond its kept eigenpairs (no
        effect on a dense ``G``)."""
        if a_eig is None:
            a_vals, a_vecs = _top_eig(acc.a_sum / max(acc.a_count, 1.0), max_rank)
        else:
            a_vals, a_vecs = a_eig
        sketched = acc.g_eig(n_data)
        resid = None
        if sketched is None:
            g_vals, g_vecs = _top_eig(acc.g_sum / max(n_data, 1), max_rank)
        else:  # already the leading eigenpairs, largest first
            g_vals, g_vecs = (t[..., :max_rank].contiguous() for t in sketched)
            if g_residual:
                resid = acc.g_residual_diag(n_data, g_vals, g_vecs)
        layer = cls(acc.in_dim, acc.out_dim, a_vals, a_vecs, g_vals, g_vecs, acc.support.clone())
        return layer if resid is None else replace(layer, g_resid=resid.contiguous())

    @property
    def has_resid(self) -> bool:
        return self.g_resid.numel() > 0

    @property
    def a_eig(self) -> tuple[Tensor, Tensor]:
        return self.a_vals, self.a_vecs

    @property
    def n_params(self) -> int:
        return self.in_dim * self.out_dim

    @property
    def n_kept(self) -> int:
        """Directions with measured curvature (with a residual diagonal: all of ``G``'s)."""
        return self.a_vals.numel() * (self.out_dim if self.has_resid else self.g_vals.numel())

    def curvature_eigvals(self, scale: float) -> Tensor:
        """``scale·λ_G,j·λ_A,i`` as a ``(k_G, k_A)`` grid (``scale`` = N / temperature)."""
        return scale * self.g_vals[:, None] * self.a_vals[None, :]

    def log_det_precision(self, scale: float, prior_precision: float) -> float:
        if self.has_resid:
            kept = sum(
                float(torch.log(scale * a * self.g_resid + prior_precision).sum())
                + 2.0 * float(torch.log(torch.diagonal(chol)).sum())
                for a, chol in zip(
                    self.a_vals.tolist(), self._woodbury_chol(scale, prior_precision), strict=True
                )
            )
        else:
            kept = torch.log(self.curvature_eigvals(scale) + prior_precision).sum().item()
        return kept + (self.n_params - self.n_kept) * math.log(prior_precision)

    def _woodbury_chol(self, scale: float, prior_precision: float) -> Tensor:
        """``(k_A, k_G, k_G)`` Cholesky factors of ``K_i = I + c_i Λ^½ Uᵀ Δ_i⁻¹ U Λ^½``
        (module doc), computed once per ``(scale, δ)``; the last pair's only (a fit evaluates
        the evidence at one ``δ`` after another, a predictive at one)."""
        key = (float(scale), float(prior_precision))
        if key not in self._woodbury:
            root = self.g_vals.clamp_min(0.0).sqrt()
            eye = torch.eye(root.numel(), dtype=self.g_vecs.dtype)
            chols = []
            for a in self.a_vals.tolist():
                c = scale * a
                inv = 1.0 / (c * self.g_resid + prior_precision)
                inner = (self.g_vecs * inv[:, None]).T @ self.g_vecs
                k_mat = eye + c * root[:, None] * inner * root[None, :]
                chols.append(torch.linalg.cholesky((k_mat + k_mat.T) / 2))
            self._woodbury.clear()
            self._woodbury[key] = (
                torch.stack(chols) if chols else eye.new_zeros(0, root.numel(), root.numel())
            )
        return self._woodbury[key]

    def project(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor | None]:
        """One option's Jacobian for this layer, in the posterior eigenbasis.

        ``a``: ``(B, T, in)`` layer inputs; ``g``: ``(B, T, out)`` output gradients of that
        option's logit, so ``J[b] = Σ_t g[b, t] a[b, t]ᵀ`` (``out × in``). Returns
        ``Q_Gᵀ J Q_A`` ``(B, k_G, k_A)`` and ``J`` itself ``(B, out, in)`` when part of it may
        lie outside the kept subspace (eigenpairs dropped or a sketched ``G``, or gradient on a
        row outside the support), else None (the usual case for a dense factor pair).

        Why ``J`` first: forming it costs ``B·T·out·in`` and projecting it
        ``B·out·in·(k_G + k_A)``, where projecting ``g`` and ``a`` position by position costs
        ``B·T·(out·k_G + in·k_A)``. A LoRA factor has ``in`` or ``out`` = r, far below the
        ``T`` positions, so ``J`` is the cheap route: for the head's vocabulary-wide
        ``lora_B`` under cloze scoring it also avoids copying the ``(B, T, vocabulary)``
        gradients again and again (``bench/laplace_predictive.py``).

        With a residual diagonal the first result is ``J Q_A`` ``(B, out, k_A)`` instead, and
        ``J`` comes only when ``A``'s eigenpairs were truncated.
        """
        dt = self.a_vecs.dtype
        dev = a.device
        j = torch.einsum("bto,bti->boi", g.to(dt), a.to(dt))
        if self.has_resid:  # ``J Q_A`` (B, out, k_A): G is handled whole in logit_cov_parts
            complete = self.a_vals.numel() == self.in_dim
            return j @ self.a_vecs.to(dev), None if complete else j
        support = self.g_support.to(dev)
        a_vecs, g_vecs = self.a_vecs.to(dev), self.g_vecs.to(dev)
        whole = support.numel() == self.out_dim  # a sorted support of every row: all of them
        j_s = j if whole else j[:, support]
        b, s, i = j_s.shape
        left = (g_vecs.T @ j_s.transpose(0, 1).reshape(s, b * i)).reshape(-1, b, i)
        j_proj = left.transpose(0, 1) @ a_vecs  # (B, k_G, k_A)
        complete = self.a_vals.numel() == self.in_dim and self.g_vals.numel() == s
        if complete and (whole or not bool(j.abs().sum((0, 2)).index_fill(0, support, 0).any())):
            return j_proj, None
        return j_proj, j

    def logit_cov_parts(
        self,
        parts: list[tuple[Tensor, Tensor | None]],
        scale: float,
        prior_precision: float,
    ) -> tuple[Tensor, Tensor | None]:
        """``J Σ Jᵀ`` from the C options' :meth:`project` results, split into the kept subspace
        ``K``'s part and the part outside it (None when no option's Jacobian leaves ``K``),
        each ``(B, C, C)``; their sum is the layer's share of the predictive covariance. The
        split says how much of it rests on curvature the fit measured and how much on the prior
        alone (``paper/laplace_variance.py``).

        The part ``J_⊥`` of a Jacobian outside the kept subspace ``K`` has the prior's variance
        ``1/δ``. ``K``'s basis being orthonormal, ``⟨J_⊥c, J_⊥d⟩ = ⟨J_c, J_d⟩ − ⟨Q_Gᵀ J_c Q_A,
        Q_Gᵀ J_d Q_A⟩``, so ``J_⊥`` is never formed. An option whose :meth:`project` gave no
        ``J`` has none (``J_⊥ = 0``), so its rows and columns of that part are zero.

        With a residual diagonal, ``K`` is every direction along ``A``'s kept eigenvectors
        (all of ``G`` has curvature), and only ``A``'s truncated eigenpairs lie outside."""
        j_proj = torch.stack([p[0] for p in parts], dim=1)  # (B, C, kG, kA) or (B, C, out, kA)
        dev = j_proj.device
        if self.has_resid:
            cov = self._resid_cov(j_proj, scale, prior_precision)
        else:
            var = 1.0 / (self.curvature_eigvals(scale).to(dev) + prior_precision)
            cov = torch.einsum("bcga,bdga,ga->bcd", j_proj, j_proj, var)
        outside = [c for c, p in enumerate(parts) if p[1] is not None]
        if not outside:
            return cov, None
        full = torch.stack([parts[c][1] for c in outside], dim=1).flatten(2)  # (B, C', out·in)
        kept = j_proj[:, outside].flatten(2)
        gram = full @ full.transpose(1, 2) - kept @ kept.transpose(1, 2)
        idx = torch.tensor(outside, device=dev)
        resid = torch.zeros_like(cov)
        resid[:, idx[:, None], idx[None, :]] = gram
        return cov, resid / prior_precision

    def _resid_cov(self, jq: Tensor, scale: float, prior_precision: float) -> Tensor:
        """``Σ_i x_iᵀ (Δ_i + c_i U Λ Uᵀ)⁻¹ x_i`` over ``A``'s kept eigenvectors for ``jq``
        ``(B, C, out, k_A)`` (``x_i = J q_i``), by Woodbury: ``Δ_i⁻¹ − Δ_i⁻¹ U Λ^½ c_i^½
        K_i⁻¹ c_i^½ Λ^½ Uᵀ Δ_i⁻¹``."""
        dev = jq.device
        u_mat, resid = self.g_vecs.to(dev), self.g_resid.to(dev)
        root = self.g_vals.clamp_min(0.0).sqrt().to(dev)
        chols = self._woodbury_chol(scale, prior_precision).to(dev)
        b, c_opt = jq.shape[:2]
        cov = jq.new_zeros(b, c_opt, c_opt)
        for i, a in enumerate(self.a_vals.tolist()):
            c = scale * a
            x = jq[..., i]  # (B, C, out)
            w = x / (c * resid + prior_precision)
            cov += w @ x.transpose(1, 2)
            u = (w @ u_mat) * (math.sqrt(max(c, 0.0)) * root)  # (B, C, k_G)
            sol = torch.cholesky_solve(u.reshape(-1, u.shape[-1]).T, chols[i])
            cov -= u @ sol.T.reshape(b, c_opt, -1).transpose(1, 2)
        return cov

    def to_tensors(self) -> dict[str, Tensor]:
        return {
            "dims": torch.tensor([self.in_dim, self.out_dim], dtype=torch.long),
            "A_vals": self.a_vals.contiguous().clone(),
            "A_vecs": self.a_vecs.contiguous().clone(),
            "G_vals": self.g_vals.contiguous().clone(),
            "G_vecs": self.g_vecs.contiguous().clone(),
            "G_support": self.g_support.contiguous().clone(),
            "G_resid": self.g_resid.contiguous().clone(),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> KronLayer:
        """The layer stored by :meth:`to_tensors`; ``ValueError`` naming the first field that
        does not fit the others: a damaged file raised an einsum or an eigh error deep in
        the predictive, or (a support index out of range) an IndexError, instead."""
        _check_stored(t)
        in_dim, out_dim = (int(x) for x in t["dims"].tolist())
        return cls(
            in_dim,
            out_dim,
            t["A_vals"].clone(),
            t["A_vecs"].clone(),
            t["G_vals"].clone(),
            t["G_vecs"].clone(),
            t["G_support"].to(torch.long).clone(),
            t["G_resid"].clone() if "G_resid" in t else torch.zeros(0, dtype=torch.float64),
        )


def _check_stored(t: dict[str, Tensor]) -> None:
    """Shapes, index range and finiteness of a stored layer (see ``KronLayer.from_tensors``)."""
    dims = t["dims"]
    if dims.shape != (2,) or dims.is_floating_point() or bool((dims < 1).any()):
        raise ValueError(f"dims must be two positive integers, got {dims.tolist()}")
    in_dim, out_dim = (int(x) for x in dims.tolist())
    k_a, k_g = t["A_vals"].numel(), t["G_vals"].numel()
    support = t["G_support"]
    expected = {
        "A_vals": (k_a,),
        "A_vecs": (in_dim, k_a),
        "G_vals": (k_g,),
        "G_support": (support.numel(),),
        "G_vecs": (support.numel(), k_g),
    }
    if "G_resid" in t and t["G_resid"].numel():
        expected["G_resid"] = (out_dim,)
    for key, shape in expected.items():
        if tuple(t[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(t[key].shape)}, expected {shape}")
    if support.is_floating_point() or (
        support.numel() and (int(support.min()) < 0 or int(support.max()) >= out_dim)
    ):
        raise ValueError(f"G_support must index the layer's {out_dim} outputs")
    for key in ("A_vals", "A_vecs", "G_vals", "G_vecs", "G_resid"):
        if key in t and not bool(torch.isfinite(t[key]).all()):
            raise ValueError(f"{key} holds a NaN or an infinity")
