"""KFAC's sketched output factor: a ``G`` whose support is too wide to store (the output head
under cloze scoring, where every vocabulary row gets a gradient) is kept as a rank-limited
sketch. Exact while the gradients span no more than its rank, the best rank-k part of one
batch's ``G``, never more than the dense ``G``, and the same posterior end to end when the
rank suffices."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from blob_lora.methods.laplace import LaplaceLoRA
from blob_lora.methods.laplace.kfac import KronAccumulator, fewest_rows
from blob_lora.methods.laplace.posterior import KronLayer
from blob_lora.tasks import MCExample
from blob_lora.tasks.dataset import MCCollator, encode_cloze_examples
from blob_lora.utils.errors import ConfigError
from tests.factories import tiny_base, tiny_tokenizer

torch.set_num_threads(1)
DT = torch.float64


def _dense_g(acc: KronAccumulator, n: int) -> torch.Tensor:
    """The accumulated ``G`` as an ``out × out`` matrix, from a dense accumulator."""
    full = torch.zeros(acc.out_dim, acc.out_dim, dtype=DT)
    full[acc.support[:, None], acc.support[None, :]] = acc.g_sum / n
    return full


def _sketch_g(acc: KronAccumulator, n: int) -> torch.Tensor:
    vals, vecs = acc.g_eig(n)
    return vecs @ torch.diag(vals) @ vecs.T


def _stream(seed: int, out: int, rank: int) -> list[torch.Tensor]:
    """(B, T, out) gradient batches spanning ``rank`` directions; the first touches only 3
    columns (a narrow support first, as the head's first batches under letter scoring)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, out, generator=gen, dtype=DT)
    first = torch.zeros(2, 3, out, dtype=DT)
    first[..., :3] = torch.randn(2, 3, 3, generator=gen, dtype=DT)
    rest = [
        torch.randn(2, 3, rank, generator=gen, dtype=DT) @ basis for _ in range(4)
    ]  # fmt: skip
    return [first, *rest]


def _fill(stream: list[torch.Tensor], **kw) -> KronAccumulator:
    acc = KronAccumulator(2, stream[0].shape[-1], "expand", DT, **kw)
    for g in stream:
        acc.add_output_grads(g)
    return acc


def test_the_sketch_equals_the_dense_g_while_its_rank_suffices() -> None:
    stream = _stream(0, out=40, rank=6)
    dense = _fill(stream)
    sketch = _fill(stream, dense_limit=8, g_rank=12)  # 3 + 6 directions <= 12
    assert dense.g_sketch is None and dense.support.numel() == 40
    assert sketch.g_sketch is not None and sketch.g_sketch.shape[0] == 40
    torch.testing.assert_close(_sketch_g(sketch, 7), _dense_g(dense, 7), rtol=1e-9, atol=1e-10)
    assert sketch.g_kept == pytest.approx(1.0, abs=1e-12)


def test_a_narrow_support_stays_dense() -> None:
    """Under letter scoring the head's gradients touch C rows: stored densely, as before."""
    stream = _stream(1, out=40, rank=6)[:1]
    acc = _fill(stream, dense_limit=8, g_rank=2)
    assert acc.g_sketch is None and acc.support.tolist() == [0, 1, 2]
    assert acc.g_eig(3) is None and acc.g_kept is None


def test_one_batch_beyond_the_rank_keeps_its_leading_eigenpairs() -> None:
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(3, 10, 30, generator=gen, dtype=DT)  # 30 rows of rank 30 > 5
    acc = _fill([g], dense_limit=4, g_rank=5)
    rows = g.reshape(-1, 30)
    exact_vals, exact_vecs = torch.linalg.eigh(rows.T @ rows / 2)
    vals, vecs = acc.g_eig(2)
    torch.testing.assert_close(vals, exact_vals.flip(0)[:5], rtol=1e-9, atol=1e-10)
    overlap = (vecs.T @ exact_vecs.flip(1)[:, :5]).abs()  # the same directions, up to sign
    torch.testing.assert_close(overlap, torch.eye(5, dtype=DT), rtol=0, atol=1e-8)
    assert acc.g_kept == pytest.approx(float(vals.sum() / exact_vals.sum()), rel=1e-9)


def test_a_stream_beyond_the_rank_never_exceeds_the_dense_g() -> None:
    """Each compression drops the smallest directions: dense G - sketch is positive
    semi-definite, and the share of the trace kept is what g_kept reports."""
    gen = torch.Generator().manual_seed(3)
    stream = [torch.randn(2, 4, 25, generator=gen, dtype=DT) for _ in range(6)]
    dense, sketch = _fill(stream), _fill(stream, dense_limit=4, g_rank=6)
    exact, approx = _dense_g(dense, 1), _sketch_g(sketch, 1)
    assert torch.linalg.eigvalsh(exact - approx).min() > -1e-9
    # the curvature any one direction lost is at most the sum of what each compression dropped
    lost = float(torch.linalg.eigvalsh(exact - approx).max())
    assert 0.0 < lost <= sketch.g_norm_dropped * (1 + 1e-9)
    assert sketch.g_kept == pytest.approx(float(approx.trace() / exact.trace()), rel=1e-9)
    assert 0.3 < sketch.g_kept < 1.0
    layer = KronLayer.from_accumulator(sketch, 1, max_rank=4)
    assert layer.g_vecs.shape == (25, 4) and layer.g_support.numel() == 25


def test_fewest_rows_keeps_the_gram_with_as_many_rows_as_each_position_spans() -> None:
    gen = torch.Generator().manual_seed(4)
    c, out = 4, 30
    one = torch.randn(out, generator=gen, dtype=DT)
    y = torch.zeros(5, c, out, dtype=DT)
    y[1] = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=DT)[:, None] * one  # rank 1 (cloze head)
    y[2, :2] = torch.randn(2, out, generator=gen, dtype=DT)  # rank 2
    y[3] = torch.randn(c, out, generator=gen, dtype=DT)  # rank C
    y[4] = 3.0 * y[1]  # rank 1; position 0 is all zero (an unread position): no row
    rows = fewest_rows(y.float(), DT, chunk=2)
    assert rows.shape == (1 + 2 + c + 1, out) and rows.dtype == DT
    flat = y.reshape(-1, out)
    torch.testing.assert_close(rows.T @ rows, flat.T @ flat, rtol=1e-5, atol=1e-5)


def test_a_set_of_passes_sketches_as_the_passes_one_by_one_with_fewer_rows() -> None:
    """The C backward passes of a cloze fit give each head position C multiples of one vector:
    once sketched, the set enters as one row per position, with the same G."""
    gen = torch.Generator().manual_seed(5)
    out, c = 40, 3
    basis = torch.randn(6, out, generator=gen, dtype=DT)
    start = torch.randn(2, 3, out, generator=gen, dtype=DT)  # wide: starts the sketch
    sets = []
    for _ in range(3):
        h = torch.randn(2, 3, 6, generator=gen, dtype=DT) @ basis  # (B, T, out)
        weights = torch.randn(c, 2, 3, 1, generator=gen, dtype=DT)
        sets.append([weights[k] * h for k in range(c)])
    one_by_one = _fill([start] + [g for gs in sets for g in gs], dense_limit=8, g_rank=64)
    grouped = _fill([start], dense_limit=8, g_rank=64)
    for gs in sets:
        grouped.add_output_grad_set(gs)
    assert grouped._n_pending == 6 + 3 * 6  # the start's 6 rows, then one per position, not C
    assert one_by_one._n_pending == 6 + 3 * c * 6
    torch.testing.assert_close(
        _sketch_g(grouped, 5), _sketch_g(one_by_one, 5), rtol=1e-9, atol=1e-10
    )
    assert grouped.g_kept == pytest.approx(1.0, abs=1e-12)


def test_bad_sketch_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="g_rank"):
        KronAccumulator(2, 3, "expand", DT, g_rank=0)
    with pytest.raises(ConfigError, match="g_dense_limit"):
        LaplaceLoRA(torch.nn.Linear(2, 2), lambda m, b: m(b), g_dense_limit=0)


# --- end to end: the output head under cloze scoring ------------------------------------------

EXAMPLES = [
    MCExample("a", "What is red?", ("apple", "the clear blue sky at noon", "grass"), 0),
    MCExample("b", "Which is cold and very hard?", ("ice", "fire", "sun"), 0),
    MCExample("c", "Pick one.", ("a b c d e f g h", "i", "j k"), 2, context="Some words."),
]


def _cloze_setup():
    from peft import LoraConfig, get_peft_model

    from blob_lora.methods.laplace_method import (
        _head_mask,
        _make_lora_trainable,
        _option_logits_fn,
    )

    tok = tiny_tokenizer()
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False
    )
    model = get_peft_model(tiny_base(tok, seed=5), lora)
    _make_lora_trainable(model)
    items, _ = encode_cloze_examples(SimpleNamespace(name="mc", style="mc"), EXAMPLES, tok, 600)
    for it, ex in zip(items, EXAMPLES, strict=True):
        it.update(label=ex.label, n_options=ex.n_options)
    batch = MCCollator(tok.pad_token_id, 3)(items)

    def fit(**kw) -> LaplaceLoRA:
        la = LaplaceLoRA(model, _option_logits_fn(None), head_mask_fn=_head_mask, **kw)
        la.fit([batch, batch])  # the second meets the sketch the first started
        return la

    return model, batch, fit


def test_a_cloze_fit_with_a_sketched_head_matches_the_dense_one() -> None:
    """Every vocabulary row of the head's lora_B gets a gradient under cloze scoring. A sketch
    of sufficient rank gives the dense fit's evidence and predictive; a small one still fits
    and predicts, reporting how much of G it kept."""
    model, batch, fit = _cloze_setup()
    head = "base_model.model.lm_head.lora_B.default"
    vocab = model.get_output_embeddings().out_features
    dense = fit()
    assert dense.layers[head].g_support.numel() == vocab and dense.g_sketch_kept == {}
    wide = fit(g_dense_limit=40, g_rank=vocab)  # the blocks' outputs are 32 wide
    assert set(wide.g_sketch_kept) == {head}
    assert wide.layers[head].g_vecs.shape[0] == vocab
    a, b = dense.log_marginal_likelihood(1.0), wide.log_marginal_likelihood(1.0)
    assert abs(a - b) <= 1e-8 * abs(a)
    for x, y in zip(
        dense.predictive_logit_moments(batch), wide.predictive_logit_moments(batch), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)
    small = fit(g_dense_limit=40, g_rank=4)
    assert small.layers[head].g_vecs.shape == (vocab, 4)
    assert 0.0 < small.g_sketch_kept[head] < 1.0
    assert wide.g_sketch_curvature_lost() == {head: 0.0}  # nothing dropped
    lost = small.g_sketch_curvature_lost(1.0)[head]
    assert lost > 0.0 and small.g_sketch_curvature_lost(10.0)[head] == pytest.approx(lost / 10)
    mean, cov = small.predictive_logit_moments(batch)
    assert torch.isfinite(mean).all() and cov.diagonal(dim1=1, dim2=2).min() > 0


def test_the_covariance_split_by_layer_sums_to_the_predictive_and_puts_the_prior_outside() -> None:
    """``logit_cov_by_layer``: the layers' kept and outside parts add up to the predictive's
    covariance; the dense q/v factors leave nothing outside; the head's outside part (the
    Jacobian's component where the fit kept no curvature: G's null space, and what a sketch
    without a residual diagonal dropped) grows as the sketch shrinks, and is the prior's
    alone, so it scales as 1/δ while the kept part does not."""
    model, batch, fit = _cloze_setup()
    head = "base_model.model.lm_head.lora_B.default"
    vocab = model.get_output_embeddings().out_features
    none = {"g_dense_limit": 40, "g_residual": "none"}  # dropped directions: the prior's
    for la in (fit(**none, g_rank=vocab), fit(**none, g_rank=4), fit(g_dense_limit=40, g_rank=4)):
        mean, cov = la.predictive_logit_moments(batch)
        mean_parts, parts = la.logit_cov_by_layer(batch)
        torch.testing.assert_close(mean_parts, mean)
        summed = sum(kept + outside for kept, outside in parts.values())
        torch.testing.assert_close(summed, cov, rtol=1e-6, atol=1e-10)
        assert set(parts) == set(la.layers)
    wide, small = fit(**none, g_rank=vocab), fit(**none, g_rank=4)
    wide_parts = wide.logit_cov_by_layer(batch)[1]
    assert all(not outside.any() for name, (_, outside) in wide_parts.items() if name != head)
    # the smaller sketch drops directions of G, which fall back on the prior
    wide_out, small_out = (
        x.logit_cov_by_layer(batch)[1][head][1].diagonal(dim1=1, dim2=2).sum()
        for x in (wide, small)
    )
    assert small_out > wide_out
    small.prior_precision = 1.0
    kept_1, outside_1 = small.logit_cov_by_layer(batch)[1][head]
    small.prior_precision = 10.0
    kept_10, outside_10 = small.logit_cov_by_layer(batch)[1][head]
    assert outside_1.diagonal(dim1=1, dim2=2).min() > 0
    torch.testing.assert_close(outside_10, outside_1 / 10)
    assert not torch.allclose(kept_10, kept_1 / 10)


def test_a_sketch_that_dropped_curvature_above_the_prior_is_warned(caplog) -> None:
    from blob_lora.methods.laplace_method import warn_dropped_curvature

    model, _, fit = _cloze_setup()
    head = "base_model.model.lm_head.lora_B.default"
    vocab = model.get_output_embeddings().out_features
    none = {"g_dense_limit": 40, "g_residual": "none"}
    small, wide = fit(**none, g_rank=4), fit(**none, g_rank=vocab)
    lost = small.g_sketch_curvature_lost(1.0)[head]
    small.prior_precision = wide.prior_precision = lost / 2  # the bound is then 2
    with caplog.at_level(logging.WARNING):
        assert warn_dropped_curvature(small) == [head]
        assert warn_dropped_curvature(wide) == []  # nothing dropped
    assert "rank-4 sketch" in caplog.text and caplog.text.count("Laplace fit") == 1
    small.prior_precision = lost * 2  # the bound is 0.5: no warning
    assert warn_dropped_curvature(small) == []
    kept_diag = fit(g_dense_limit=40, g_rank=4)  # the residual diagonal keeps what it dropped
    kept_diag.prior_precision = lost / 2
    assert kept_diag.g_sketch_curvature_lost()[head] == pytest.approx(2.0)
    assert warn_dropped_curvature(kept_diag) == []


def test_the_fit_from_cached_frozen_blocks_equals_the_full_forward() -> None:
    """fit_laplace forwards its batches from the training split's cached frozen-block
    features: the frozen blocks hold no LoRA weight, so the fitted posterior is the full
    forward's (to rounding), and the blocks below the adapters never run."""
    from peft import LoraConfig, get_peft_model

    from blob_lora.methods.laplace_method import (
        _head_mask,
        _make_lora_trainable,
        _option_logits_fn,
    )
    from blob_lora.models.prefix_cache import PrefixFeatureCache
    from blob_lora.tasks import Scoring
    from blob_lora.tasks.dataset import (
        EncodedDataset,
        IndexedCollator,
        IndexedDataset,
        encode_split,
    )

    tok = tiny_tokenizer()
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*layers\.1\.self_attn\.(q_proj|v_proj)|.*lm_head",
        init_lora_weights=False,
    )
    model = get_peft_model(tiny_base(tok, seed=7), lora)
    _make_lora_trainable(model)
    mc = SimpleNamespace(name="mc", style="mc")
    dataset = EncodedDataset(encode_split(mc, EXAMPLES, tok, 600, Scoring("cloze", "none")))
    collate = IndexedCollator(MCCollator(tok.pad_token_id, 3))
    batches = [collate([IndexedDataset(dataset)[i] for i in rows]) for rows in ([0, 1], [2])]
    cache = PrefixFeatureCache.for_dataset(model, dataset, None)
    assert cache is not None and cache.start == 1
    first_block = model.get_base_model().model.layers[0]
    calls = []
    handle = first_block.register_forward_hook(lambda *a: calls.append(1))

    def fit(prefix) -> LaplaceLoRA:
        la = LaplaceLoRA(model, _option_logits_fn(None, prefix), head_mask_fn=_head_mask)
        la.fit(batches)
        return la

    full = fit(None)
    assert len(calls) == 2  # one full forward per batch
    cache.output_for(model, *_without_index(batches[0]))  # warm: features of the first batch
    cache.output_for(model, *_without_index(batches[1]))
    calls.clear()
    cached = fit(cache)
    handle.remove()
    assert calls == []  # the frozen block never ran in the cached fit
    a, b = full.log_marginal_likelihood(1.0), cached.log_marginal_likelihood(1.0)
    assert abs(a - b) <= 1e-6 * abs(a)
    for name, layer in full.layers.items():
        torch.testing.assert_close(cached.layers[name].g_vals, layer.g_vals, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(cached.layers[name].a_vals, layer.a_vals, rtol=1e-4, atol=1e-8)


def _without_index(batch: dict) -> tuple[dict, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "index"}, batch["index"]
