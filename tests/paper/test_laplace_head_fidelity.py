"""paper/laplace_head_fidelity.py's two pieces of arithmetic: a variant cut from the exact ``G``
(leading pairs, plus the exact diagonal of the rest) and a variant's head covariance rebuilt
from the recorded ``J Q_A``, both against the library's own computation."""

from __future__ import annotations

import torch

from blob_lora.methods.laplace.kfac import KronAccumulator
from blob_lora.methods.laplace.posterior import KronLayer
from tests.conftest import load_script

DT = torch.float64


def _exact_layer() -> tuple[KronLayer, torch.Tensor]:
    """A head-like layer (in = 3, out = 20) whose G holds every row it saw (a sketch wider
    than the rows: exact), and those rows."""
    gen = torch.Generator().manual_seed(0)
    acc = KronAccumulator(3, 20, "expand", DT, dense_limit=4, g_rank=64)
    rows = torch.randn(2, 6, 20, generator=gen, dtype=DT)
    acc.add_output_grads(rows)
    acc.add_inputs(torch.randn(2, 5, 3, generator=gen, dtype=DT), None)
    return KronLayer.from_accumulator(acc, 4), rows.reshape(-1, 20)


def test_a_cut_variant_is_the_exact_g_minus_its_dropped_pairs_plus_their_diagonal() -> None:
    module = load_script("paper/laplace_head_fidelity.py", "paper_laplace_head_fidelity")
    exact, rows = _exact_layer()
    dense = rows.T @ rows / 4
    cut = module.top_eigenpairs(exact, 3, residual=False)
    kept = cut.g_vecs @ torch.diag(cut.g_vals) @ cut.g_vecs.T
    assert cut.g_vals.numel() == 3 and not cut.has_resid
    with_diag = module.top_eigenpairs(exact, 3, residual=True)
    torch.testing.assert_close(with_diag.g_resid, torch.diagonal(dense - kept), atol=1e-10, rtol=0)


def test_the_head_covariance_from_the_recorded_projection_is_the_layers_own() -> None:
    module = load_script("paper/laplace_head_fidelity.py", "paper_laplace_head_fidelity")
    exact, _ = _exact_layer()
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, 4, 3, generator=gen, dtype=DT)
    grads = [torch.randn(2, 4, 20, generator=gen, dtype=DT) for _ in range(3)]
    recorder = module.RecordingLayer(
        exact.in_dim, exact.out_dim, exact.a_vals, exact.a_vecs, exact.g_vals, exact.g_vecs,
        exact.g_support,
    )  # fmt: skip
    recorder.recorded = []
    recorder.logit_cov_parts([recorder.project(a, g) for g in grads], 3.0, 0.5)
    (jq,) = recorder.recorded
    for variant in (
        exact,
        module.top_eigenpairs(exact, 2, residual=False),
        module.top_eigenpairs(exact, 2, residual=True),
    ):
        kept, outside = variant.logit_cov_parts([variant.project(a, g) for g in grads], 3.0, 0.5)
        own = kept if outside is None else kept + outside
        torch.testing.assert_close(module.head_cov(variant, jq, 3.0, 0.5), own)
