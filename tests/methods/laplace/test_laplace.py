"""Laplace-LoRA: KFAC posterior checked against dense exact-GGN Laplace on toy models, plus a
tiny random PEFT Llama for the sequence / lm_head-support / persistence paths."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call

from blob_lora.methods.laplace import LaplaceLoRA
from blob_lora.utils.errors import ConfigError, DataError

torch.set_num_threads(1)
DT = torch.float64


class Toy(nn.Module):
    """Frozen embedding -> Linear -> tanh -> Linear -> C logits; one input position."""

    def __init__(self, vocab: int = 9, d: int = 4, h: int = 5, n_opt: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.emb.weight.requires_grad_(False)
        self.l1 = nn.Linear(d, h, bias=False)
        self.l2 = nn.Linear(h, n_opt, bias=False)
        with torch.no_grad():
            self.l2.weight.mul_(3.0)
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(self.emb(x))))


def toy_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["x"])
    if "option_mask" in batch:
        logits = logits.masked_fill(~batch["option_mask"], float("-inf"))
    return logits


def batch(xs: list[int], ys: list[int] | None = None) -> dict:
    b = {"x": torch.tensor(xs)}
    if ys is not None:
        b["labels"] = torch.tensor(ys)
    return b


# ------------------------------------------------------------------ dense reference


class Dense:
    """Exact-GGN Laplace with dense matrices over the trainable parameters."""

    def __init__(
        self,
        model: nn.Module,
        data: list[dict],
        temperature: float = 1.0,
        inputs: Callable[[dict], tuple] = lambda b: (b["x"],),
    ):
        self.model = model
        self.inputs = inputs
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
        self.theta = torch.cat([model.get_parameter(n).detach().flatten() for n in self.names])
        self.sizes = [math.prod(s) for s in self.shapes]
        self.temperature = temperature
        p_dim = self.theta.numel()
        self.ggn = torch.zeros(p_dim, p_dim, dtype=DT)
        self.loglik = 0.0
        for b in data:
            jac = self.jac(b)  # (B, C, P)
            logits = model(*inputs(b)).detach()
            prob = torch.softmax(logits, -1)
            hess = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
            self.ggn += torch.einsum("bcp,bcd,bdq->pq", jac, hess, jac)
            self.loglik += float(
                torch.log_softmax(logits, -1).gather(1, b["labels"][:, None]).sum()
            )

    def jac(self, b: dict) -> torch.Tensor:
        def f(theta: torch.Tensor) -> torch.Tensor:
            params = dict(
                zip(
                    self.names,
                    [
                        t.reshape(s)
                        for t, s in zip(theta.split(self.sizes), self.shapes, strict=True)
                    ],
                    strict=True,
                )
            )
            return functional_call(self.model, params, self.inputs(b))

        return torch.autograd.functional.jacobian(f, self.theta)

    def block_diagonal(self) -> None:
        mask = torch.zeros_like(self.ggn, dtype=torch.bool)
        start = 0
        for s in self.sizes:
            mask[start : start + s, start : start + s] = True
            start += s
        self.ggn = self.ggn * mask

    def precision(self, delta: float) -> torch.Tensor:
        return self.ggn / self.temperature + delta * torch.eye(self.ggn.shape[0], dtype=DT)

    def cov(self, b: dict, delta: float) -> torch.Tensor:
        jac = self.jac(b)
        sigma = torch.linalg.inv(self.precision(delta))
        return torch.einsum("bcp,pq,bdq->bcd", jac, sigma, jac)

    def marglik(self, delta: float) -> float:
        p_dim = self.theta.numel()
        logdet = torch.linalg.slogdet(self.precision(delta))[1]
        return float(
            self.loglik / self.temperature
            - 0.5 * delta * self.theta.pow(2).sum()
            + 0.5 * p_dim * math.log(delta)
            - 0.5 * logdet
        )


TEST = batch([0, 3, 5, 8])


# ------------------------------------------------------------------ (a) exactness


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_one_layer_one_example_matches_dense_exactly(temperature: float) -> None:
    model = Toy()
    model.l1.weight.requires_grad_(False)
    data = [batch([2], [1])]
    la = LaplaceLoRA(model, toy_logits, prior_precision=0.7, temperature=temperature)
    la.fit(data)
    dense = Dense(model, data, temperature)
    mean, cov = la.predictive_logit_moments(TEST)
    torch.testing.assert_close(mean, model(TEST["x"]).detach())
    torch.testing.assert_close(cov, dense.cov(TEST, 0.7), rtol=1e-9, atol=1e-12)
    for delta in (0.01, 0.7, 30.0):
        assert la.log_marginal_likelihood(delta) == pytest.approx(dense.marglik(delta), rel=1e-10)


def test_two_layers_one_example_matches_block_diagonal_dense() -> None:
    """Per-example, single-position KFAC blocks are exact; only cross-layer blocks are dropped."""
    model = Toy()
    data = [batch([4], [0])]
    la = LaplaceLoRA(model, toy_logits, prior_precision=0.3)
    la.fit(data)
    dense = Dense(model, data)
    dense.block_diagonal()
    _, cov = la.predictive_logit_moments(TEST)
    torch.testing.assert_close(cov, dense.cov(TEST, 0.3), rtol=1e-9, atol=1e-12)
    assert la.log_marginal_likelihood(0.3) == pytest.approx(dense.marglik(0.3), rel=1e-10)


def test_two_layers_many_examples_close_to_full_ggn() -> None:
    """KFAC (Kronecker + block-diagonal) vs the full dense GGN on 12 examples.

    Measured on this toy: logit standard deviations within 13 %, probit probabilities within
    0.006 and the evidence within 2.1 nats (of -33); the test allows 30 %, 0.02 and 4 nats.
    """
    model = Toy()
    g = torch.Generator().manual_seed(1)
    data = [
        batch(
            torch.randint(0, 9, (4,), generator=g).tolist(),
            torch.randint(0, 3, (4,), generator=g).tolist(),
        )
        for _ in range(3)
    ]
    la = LaplaceLoRA(model, toy_logits, prior_precision=1.0)
    la.fit(data)
    dense = Dense(model, data)
    mean, cov = la.predictive_logit_moments(TEST)
    ref = dense.cov(TEST, 1.0)
    sd, sd_ref = cov.diagonal(dim1=1, dim2=2).sqrt(), ref.diagonal(dim1=1, dim2=2).sqrt()
    assert ((sd / sd_ref - 1).abs() < 0.3).all()
    var_ref = ref.diagonal(dim1=1, dim2=2)
    probit_ref = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var_ref), -1)
    assert (la.predictive(TEST) - probit_ref).abs().max() < 0.02
    assert abs(la.log_marginal_likelihood(1.0) - dense.marglik(1.0)) < 4.0


# ------------------------------------------------------------------ (b), (c) prior precision


def fitted_toy(n_batches: int = 3) -> LaplaceLoRA:
    model = Toy()
    g = torch.Generator().manual_seed(2)
    data = [
        batch(
            torch.randint(0, 9, (3,), generator=g).tolist(),
            torch.randint(0, 3, (3,), generator=g).tolist(),
        )
        for _ in range(n_batches)
    ]
    la = LaplaceLoRA(model, toy_logits)
    la.fit(data)
    return la


def test_predictive_variance_shrinks_with_prior_precision() -> None:
    la = fitted_toy()
    variances = []
    for delta in (0.01, 0.1, 1.0, 10.0, 100.0):
        la.prior_precision = delta
        variances.append(la.predictive_logit_moments(TEST)[1].diagonal(dim1=1, dim2=2))
    for small, large in zip(variances, variances[1:], strict=False):
        assert (large < small).all()
    # Sharper posterior -> closed-form probabilities move towards the MAP softmax.
    la.prior_precision = 1e6
    map_probs = torch.softmax(la.predictive_logit_moments(TEST)[0], -1)
    torch.testing.assert_close(la.predictive(TEST), map_probs, atol=1e-4, rtol=0)


def test_optimize_prior_precision_is_grid_argmax_and_matches_dense_evidence() -> None:
    model = Toy()
    model.l1.weight.requires_grad_(False)
    data = [batch([6], [2])]
    la = LaplaceLoRA(model, toy_logits)
    la.fit(data)
    dense = Dense(model, data)
    grid = [float(x) for x in torch.logspace(-3, 3, 25)]
    best = la.optimize_prior_precision(grid)
    scores = [la.log_marginal_likelihood(d) for d in grid]
    assert best == grid[max(range(len(grid)), key=scores.__getitem__)]
    assert la.prior_precision == best
    assert 0 < grid.index(best) < len(grid) - 1  # interior optimum on this toy
    dense_scores = [dense.marglik(d) for d in grid]
    assert scores == pytest.approx(dense_scores, rel=1e-10)


def test_default_grid_on_several_examples() -> None:
    la = fitted_toy()
    best = la.optimize_prior_precision()
    assert la.log_marginal_likelihood(best) >= la.log_marginal_likelihood(best * 1.5)
    assert la.log_marginal_likelihood(best) >= la.log_marginal_likelihood(best / 1.5)


# ------------------------------------------------------------------ predictive details


def test_masked_options_have_zero_probability() -> None:
    la = fitted_toy()
    b = dict(TEST, option_mask=torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 1, 1]]).bool())
    mean, cov = la.predictive_logit_moments(b)
    assert torch.isneginf(mean[0, 2]) and torch.isneginf(mean[2, 0])
    assert (cov[0, 2] == 0).all() and (cov[0, :, 2] == 0).all()
    for probs in (la.predictive(b), la.predictive(b, n_samples=50)):
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DT))
        assert probs[0, 2] == 0 and probs[2, 0] == 0
    samples = la.predictive_samples(b, 7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (7, 4, 3)
    assert (samples[:, 0, 2] == 0).all()
    torch.testing.assert_close(samples.sum(-1), torch.ones(7, 4, dtype=DT))
    assert samples.std(0).max() > 1e-3  # samples really differ


def test_monte_carlo_matches_reference_sampler_and_probit_when_variance_is_small() -> None:
    la = fitted_toy()
    la.prior_precision = 0.5
    mean, cov = la.predictive_logit_moments(TEST)
    mc = la.predictive(TEST, n_samples=4000, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    ref = torch.distributions.MultivariateNormal(mean, cov + 1e-12 * torch.eye(3, dtype=DT))
    ref_probs = torch.softmax(ref.sample((4000,)), -1).mean(0)
    assert (mc - ref_probs).abs().max() < 0.02
    # Probit ignores logit correlations: only close when the variance is small.
    # Measured gaps 0.05 (logit variances up to 1.1), 0.015 (0.2), 0.002 (0.025).
    gaps = []
    for delta in (5.0, 50.0, 500.0):
        la.prior_precision = delta
        probit = la.predictive(TEST)
        mc = la.predictive(TEST, n_samples=20000, generator=torch.Generator().manual_seed(0))
        gaps.append(float((probit - mc).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[1] < 0.025 and gaps[2] < 0.005


def test_fit_with_masked_option_in_training() -> None:
    model = Toy()
    data = [dict(batch([1, 2], [0, 1]), option_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())]
    la = LaplaceLoRA(model, toy_logits)
    la.fit(data)
    assert math.isfinite(la.log_marginal_likelihood())
    bad = [dict(batch([1], [2]), option_mask=torch.tensor([[1, 1, 0]]).bool())]
    with pytest.raises(DataError):
        la.fit(bad)


def test_mc_ggn_approaches_exact() -> None:
    model = Toy()
    data = [batch([1, 4, 7], [0, 1, 2])]
    exact = LaplaceLoRA(model, toy_logits)
    exact.fit(data)
    mc = LaplaceLoRA(model, toy_logits, ggn="mc", mc_samples=3000)
    mc.fit(data)
    for name in exact.layers:
        assert mc.layers[name].g_vals.sum() == pytest.approx(
            float(exact.layers[name].g_vals.sum()), rel=0.1
        )
    assert mc.log_marginal_likelihood() == pytest.approx(exact.log_marginal_likelihood(), rel=0.05)


def test_truncation_keeps_prior_outside_kept_subspace() -> None:
    """Rank-1 factors: dropped directions get prior variance, so the variance only grows."""
    model = Toy()
    data = [batch([1, 4, 7], [0, 1, 2])]
    full = LaplaceLoRA(model, toy_logits)
    full.fit(data)
    low = LaplaceLoRA(model, toy_logits, max_rank=1)
    low.fit(data)
    v_full = full.predictive_logit_moments(TEST)[1].diagonal(dim1=1, dim2=2)
    v_low = low.predictive_logit_moments(TEST)[1].diagonal(dim1=1, dim2=2)
    assert (v_low >= v_full - 1e-12).all() and (v_low > v_full + 1e-6).any()
    # With the prior alone (no curvature kept at all) the variance is ‖J‖²/δ: an upper bound.
    assert math.isfinite(low.log_marginal_likelihood())


def test_refuses_other_trainable_parameters() -> None:
    model = Toy()
    model.emb.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="emb.weight"):
        LaplaceLoRA(model, toy_logits)


def test_trainable_bias_is_folded_into_kfac() -> None:
    model = Toy()
    model.l1.weight.requires_grad_(False)
    model.l2 = nn.Linear(5, 3, bias=True).to(DT)
    data = [batch([3], [1])]
    la = LaplaceLoRA(model, toy_logits, prior_precision=0.4)
    la.fit(data)
    dense = Dense(model, data)
    torch.testing.assert_close(
        la.predictive_logit_moments(TEST)[1], dense.cov(TEST, 0.4), rtol=1e-9, atol=1e-12
    )
    assert la.log_marginal_likelihood() == pytest.approx(dense.marglik(0.4), rel=1e-10)


# ------------------------------------------------------------------ sequence dimension


class SeqToy(nn.Module):
    """Per-position trainable Linear, masked mean-pool, trainable Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(9, 4)
        self.emb.weight.requires_grad_(False)
        self.l1 = nn.Linear(4, 3, bias=False)
        self.l2 = nn.Linear(3, 3, bias=False)
        self.to(DT)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.l1(self.emb(x)) * mask[..., None]
        return self.l2(h.sum(1) / mask.sum(1, keepdim=True))


def seq_logits(model: nn.Module, b: dict) -> torch.Tensor:
    return model(b["input_ids"], b["attention_mask"].to(DT))


def test_padding_positions_do_not_enter_the_factors() -> None:
    model = SeqToy()
    plain = {
        "input_ids": torch.tensor([[1, 2, 3]]),
        "attention_mask": torch.ones(1, 3),
        "labels": torch.tensor([1]),
    }
    padded = {
        "input_ids": torch.tensor([[7, 7, 1, 2, 3]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1]]),
        "labels": torch.tensor([1]),
    }
    for kfac_type in ("expand", "reduce"):
        a = LaplaceLoRA(model, seq_logits, kfac_type=kfac_type)
        a.fit([plain])
        b = LaplaceLoRA(model, seq_logits, kfac_type=kfac_type)
        b.fit([padded])
        assert a.log_marginal_likelihood() == pytest.approx(b.log_marginal_likelihood(), rel=1e-12)
        torch.testing.assert_close(a.predictive(plain), b.predictive(padded))


def test_reduce_is_exact_for_linear_weight_sharing_then_pooling() -> None:
    """With a linear per-position layer followed by mean pooling, J = u āᵀ: KFAC-reduce is
    exact per example, KFAC-expand is not (it drops cross-position terms)."""
    model = SeqToy()
    data = [
        {
            "input_ids": torch.tensor([[1, 5, 3, 8]]),
            "attention_mask": torch.ones(1, 4),
            "labels": torch.tensor([2]),
        }
    ]
    test = {
        "input_ids": torch.tensor([[2, 4, 6, 0], [3, 3, 1, 7]]),
        "attention_mask": torch.ones(2, 4),
    }

    dense = Dense(model, data, inputs=lambda b: (b["input_ids"], b["attention_mask"].to(DT)))
    dense.block_diagonal()
    reduce = LaplaceLoRA(model, seq_logits, kfac_type="reduce", prior_precision=0.5)
    reduce.fit(data)
    torch.testing.assert_close(
        reduce.predictive_logit_moments(test)[1], dense.cov(test, 0.5), rtol=1e-9, atol=1e-12
    )
    assert reduce.log_marginal_likelihood() == pytest.approx(dense.marglik(0.5), rel=1e-10)
    expand = LaplaceLoRA(model, seq_logits, kfac_type="expand", prior_precision=0.5)
    expand.fit(data)
    assert expand.log_marginal_likelihood() != pytest.approx(dense.marglik(0.5), rel=1e-6)
