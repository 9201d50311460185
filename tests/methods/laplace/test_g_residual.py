"""A sketched ``G`` plus the exact diagonal of what the sketch drops (``g_residual="diag"``).

The residual diagonal is the dense ``G``'s diagonal minus the kept eigenpairs'; a layer with it
has the precision ``(N/T)·A ⊗ (D + U Λ Uᵀ) + δ I`` exactly (log determinant and Jacobian
sandwich checked against that matrix built densely), only adds precision to the sketch alone,
and survives a save/load round trip; states saved before it existed still load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from blob_lora.methods.laplace.kfac import KronAccumulator
from blob_lora.methods.laplace.posterior import KronLayer
from blob_lora.utils.errors import CheckpointError
from tests.methods.laplace.test_g_sketch import _cloze_setup

torch.set_num_threads(1)
DT = torch.float64
HEAD = "base_model.model.lm_head.lora_B.default"


def _filled(seed: int, out: int = 30, g_rank: int = 5) -> tuple[KronAccumulator, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    stream = [torch.randn(2, 4, out, generator=gen, dtype=DT) for _ in range(5)]
    acc = KronAccumulator(3, out, "expand", DT, dense_limit=4, g_rank=g_rank)
    for g in stream:
        acc.add_output_grads(g)
    rows = torch.cat([g.reshape(-1, out) for g in stream])
    return acc, rows


def test_the_residual_diagonal_is_the_dense_diagonal_minus_the_kept_eigenpairs() -> None:
    acc, rows = _filled(0)
    n = 7
    dense = rows.T @ rows / n
    vals, vecs = acc.g_eig(n)
    resid = acc.g_residual_diag(n, vals, vecs)
    assert resid is not None and resid.shape == (30,)
    expected = torch.diagonal(dense - vecs @ torch.diag(vals) @ vecs.T)
    torch.testing.assert_close(resid, expected, rtol=1e-9, atol=1e-12)
    assert resid.min() >= 0 and resid.sum() > 0.1 * dense.trace()  # rank 5 of 30: much dropped
    # fewer kept eigenpairs leave more on the diagonal; all of them leave (almost) nothing
    fewer = acc.g_residual_diag(n, vals[:2], vecs[:, :2])
    torch.testing.assert_close(fewer - resid, (vecs[:, 2:].pow(2) * vals[2:]).sum(1))
    wide, _ = _filled(0, g_rank=30)
    w_vals, w_vecs = wide.g_eig(n)
    assert wide.g_residual_diag(n, w_vals, w_vecs).abs().max() < 1e-10 * dense.diagonal().max()
    dense_acc = KronAccumulator(3, 30, "expand", DT)  # a dense G has no residual
    dense_acc.add_output_grads(rows[None])
    assert dense_acc.g_residual_diag(n, vals, vecs) is None


def _random_layer(seed: int, in_dim: int, out: int, k_a: int, k_g: int) -> KronLayer:
    gen = torch.Generator().manual_seed(seed)
    a_vecs = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=gen, dtype=DT))[0][:, :k_a]
    g_vecs = torch.linalg.qr(torch.randn(out, k_g, generator=gen, dtype=DT))[0]
    return KronLayer(
        in_dim,
        out,
        torch.rand(k_a, generator=gen, dtype=DT).sort(descending=True).values * 3,
        a_vecs,
        torch.rand(k_g, generator=gen, dtype=DT).sort(descending=True).values * 2,
        g_vecs,
        torch.arange(out),
        torch.rand(out, generator=gen, dtype=DT) * 0.5,
    )


def _dense_precision(layer: KronLayer, scale: float, delta: float) -> Tensor:
    """``scale·(A ⊗ G) + δ I`` on ``vec(W)`` (``W``: out × in, row-major), with ``A`` and
    ``G = D + U Λ Uᵀ`` rebuilt from the layer's parts."""
    a = layer.a_vecs @ torch.diag(layer.a_vals) @ layer.a_vecs.T
    g = layer.g_vecs @ torch.diag(layer.g_vals) @ layer.g_vecs.T + torch.diag(layer.g_resid)
    return scale * torch.kron(g, a) + delta * torch.eye(layer.n_params, dtype=DT)


@pytest.mark.parametrize("k_a", [4, 2])  # A complete, A truncated (the rest: the prior)
def test_a_layer_with_a_residual_diagonal_is_the_dense_precision(k_a: int) -> None:
    layer = _random_layer(1, in_dim=4, out=9, k_a=k_a, k_g=3)
    scale, delta = 5.0, 0.7
    prec = _dense_precision(layer, scale, delta)
    assert layer.log_det_precision(scale, delta) == pytest.approx(
        float(torch.linalg.slogdet(prec)[1]), rel=1e-10
    )
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 4, generator=gen, dtype=DT)  # (B, T, in)
    grads = [torch.randn(2, 3, 9, generator=gen, dtype=DT) for _ in range(3)]  # C = 3 options
    parts = [layer.project(a, g) for g in grads]
    kept, outside = layer.logit_cov_parts(parts, scale, delta)
    jac = torch.stack([torch.einsum("bto,bti->boi", g, a).flatten(1) for g in grads], 1)
    expected = jac @ torch.linalg.solve(prec, jac.transpose(1, 2))  # (B, C, C)
    total = kept if outside is None else kept + outside
    torch.testing.assert_close(total, expected, rtol=1e-9, atol=1e-12)
    assert (outside is None) == (k_a == 4)


def test_the_residual_diagonal_only_tightens_the_posterior_and_vanishes_when_nothing_dropped():
    """The diagonal adds precision the sketch alone leaves to the prior: the head's covariance
    without it minus with it is positive semi-definite, and the evidence's log det grows. When
    the sketch keeps all of G there is nothing to add: the two fits agree."""
    model, batch, fit = _cloze_setup()
    vocab = model.get_output_embeddings().out_features
    none = fit(g_dense_limit=40, g_rank=4, g_residual="none")
    diag = fit(g_dense_limit=40, g_rank=4)
    assert diag.layers[HEAD].has_resid and not none.layers[HEAD].has_resid
    cov_none = none.logit_cov_by_layer(batch)[1][HEAD]
    cov_diag = diag.logit_cov_by_layer(batch)[1][HEAD]
    diff = (cov_none[0] + cov_none[1]) - (cov_diag[0] + cov_diag[1])
    assert torch.linalg.eigvalsh(diff.double()).min() > -1e-9
    assert diff.diagonal(dim1=1, dim2=2).sum() > 0
    for delta in (0.1, 1.0, 10.0):
        assert diag.log_det_posterior_precision(delta) > none.log_det_posterior_precision(delta)
    full_none = fit(g_dense_limit=40, g_rank=vocab, g_residual="none")
    full_diag = fit(g_dense_limit=40, g_rank=vocab)
    a, b = full_none.log_marginal_likelihood(1.0), full_diag.log_marginal_likelihood(1.0)
    assert abs(a - b) <= 1e-8 * abs(a)
    for x, y in zip(
        full_none.predictive_logit_moments(batch),
        full_diag.predictive_logit_moments(batch),
        strict=True,
    ):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


def test_a_residual_diagonal_survives_save_and_load_and_old_states_still_load(tmp_path) -> None:
    model, batch, fit = _cloze_setup()
    diag = fit(g_dense_limit=40, g_rank=4)
    path = tmp_path / "laplace_state.safetensors"
    save_file(diag.state_dict(), str(path))
    restored = fit(g_dense_limit=40, g_rank=4, g_residual="none")  # overwritten by the load
    restored.load_state_dict(load_file(str(path)))
    assert torch.equal(restored.layers[HEAD].g_resid, diag.layers[HEAD].g_resid)
    for x, y in zip(
        restored.predictive_logit_moments(batch), diag.predictive_logit_moments(batch), strict=True
    ):
        assert torch.equal(x, y)
    # a state written before the residual diagonal existed: no G_resid, loads as "none"
    none = fit(g_dense_limit=40, g_rank=4, g_residual="none")
    old = {k: v for k, v in none.state_dict().items() if not k.endswith(".G_resid")}
    restored.load_state_dict(old)
    assert not restored.layers[HEAD].has_resid
    torch.testing.assert_close(
        restored.predictive_logit_moments(batch)[1], none.predictive_logit_moments(batch)[1]
    )
    bad = dict(diag.state_dict())
    bad[f"layers.{HEAD}.G_resid"] = bad[f"layers.{HEAD}.G_resid"][:3]
    with pytest.raises(CheckpointError, match=r"G_resid has shape \(3,\), expected"):
        restored.load_state_dict(bad)
