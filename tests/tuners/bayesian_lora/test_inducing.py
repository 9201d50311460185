"""The inducing-weight posterior of Bayesian-LoRA against its definition: the collapsed posterior
is plain LoRA, samples have the stated mean and conditional covariance, the KL is the KL."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from blob_lora.tuners.bayesian_lora import BayesianLoraConfig, InducingWeight, sampling
from blob_lora.tuners.bayesian_lora.inducing import inverse_softplus, jittered_cholesky
from tests.factories import one_layer_bayesian_lora

torch.set_num_threads(1)


def set_spread(module: InducingWeight, lamda: float | None, u_std: float | None) -> None:
    """Set lambda and the std of q(V); ``None`` collapses it to exactly zero."""
    with torch.no_grad():
        module.lamda_raw.fill_(-200.0 if lamda is None else inverse_softplus(lamda))
        module.u_std_raw.fill_(-200.0 if u_std is None else inverse_softplus(u_std))


def spread_out(layer, lamda, u_std) -> None:
    for posterior in (layer.lora_inducing_A["default"], layer.lora_inducing_B["default"]):
        set_spread(posterior, lamda, u_std)
        with torch.no_grad():
            posterior.u_mean.mul_(20.0)  # factors large enough to move the output


def plain_lora_with_means(model, layer):
    """PEFT LoRA on the same base, its A and B the posterior means of ``layer``."""
    base = copy.deepcopy(model.base_model.model)
    proj = base.proj
    base.proj = proj.base_layer  # the bare nn.Linear under the Bayesian layer
    lora = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["proj"]))
    with torch.no_grad():
        lora.base_model.model.proj.lora_A["default"].weight.copy_(
            layer.lora_inducing_A["default"].mean_weight()
        )
        lora.base_model.model.proj.lora_B["default"].weight.copy_(
            layer.lora_inducing_B["default"].mean_weight()
        )
    return lora


@pytest.mark.parametrize("mode", ["shared", "independent"])
def test_collapsed_posterior_is_plain_lora(mode):
    model, layer = one_layer_bayesian_lora(max_lamda=1.0, max_u_std=1.0)
    spread_out(layer, None, None)  # lambda = 0 and std of q(U) = 0 exactly
    lora = plain_lora_with_means(model, layer)
    x = torch.randn(4, 3, 6)
    expected = lora(x)
    assert (expected - layer.base_layer(x)).abs().max() > 1e-2  # the adapter matters
    with torch.no_grad(), sampling(model, True, mode=mode):
        for _ in range(3):  # every draw is the same, plain-LoRA output
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    with torch.no_grad(), sampling(model, False):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def test_output_converges_to_plain_lora_as_the_variance_vanishes():
    model, layer = one_layer_bayesian_lora(max_lamda=1.0, max_u_std=1.0)
    spread_out(layer, 0.1, 0.1)
    means = {k: p.detach().clone() for k, p in model.named_parameters() if "u_mean" in k}
    lora = plain_lora_with_means(model, layer)
    x = torch.randn(8, 3, 6)
    expected = lora(x).detach()
    gaps = []
    for spread in (0.1, 0.01, 0.001):
        for posterior in (layer.lora_inducing_A["default"], layer.lora_inducing_B["default"]):
            set_spread(posterior, spread, spread)
        assert all(torch.equal(p, means[k]) for k, p in model.named_parameters() if k in means)
        torch.manual_seed(0)
        with torch.no_grad(), sampling(model, True, mode="independent"):
            gaps.append((model(x) - expected).abs().mean().item())
    # the gap to plain LoRA shrinks in proportion to the spread (lambda and the std of U)
    assert gaps[0] > 1e-4
    for bigger, smaller in zip(gaps, gaps[1:], strict=False):
        assert 3.0 < bigger / smaller < 30.0, gaps


def small_posterior(seed: int = 0, d_out: int = 3, d_in: int = 4, **kw) -> InducingWeight:
    torch.manual_seed(seed)
    cfg = BayesianLoraConfig(
        inducing_rows=2,
        inducing_cols=2,
        prior_std=1.0,
        sqrt_width_scaling=False,
        max_lamda=1.0,
        max_u_std=1.0,
        **kw,
    )
    return InducingWeight(d_out, d_in, cfg)


def test_samples_have_the_posterior_mean_and_the_conditional_covariance():
    post = small_posterior()
    lam = 0.5
    set_spread(post, lam, None)  # U fixed at its mean: W | U only
    with torch.no_grad():  # a visible D: all four terms of Matheron's U-block matter
        post.d_row_raw.fill_(inverse_softplus(0.5))
        post.d_col_raw.fill_(inverse_softplus(0.5))
    sigma = post.conditional_covariance().detach().double()
    # the Kronecker-factored reduction is far from the identity: the test can tell
    assert (sigma - torch.eye(12, dtype=torch.float64)).abs().max() > 0.3
    torch.manual_seed(1)
    n = 40_000
    with torch.no_grad():
        draws = post.sample_weight(n).double().reshape(n, -1)  # row-major vec(W)
        mean = post.mean_weight().double().reshape(-1)
    torch.testing.assert_close(draws.mean(0), mean, rtol=0, atol=4 * lam / math.sqrt(n) * 1.5)
    centred = draws - mean
    cov = centred.T @ centred / n
    torch.testing.assert_close(cov, lam**2 * sigma, rtol=0, atol=0.01)


def test_mean_weight_is_the_mean_over_q_of_u():
    post = small_posterior(seed=2)
    set_spread(post, 0.05, 0.8)  # wide q(U): the mean must hold through the U draws too
    torch.manual_seed(3)
    n = 40_000
    with torch.no_grad():
        draws = post.sample_weight(n).double()
        mean = post.mean_weight().double()
    err = (draws.mean(0) - mean).abs().max()
    spread = draws.std(0).max()
    assert err < 5 * spread / math.sqrt(n), (err, spread)


def test_kl_matches_a_monte_carlo_estimate():
    post = small_posterior(seed=4)
    lam = 0.2
    with torch.no_grad():
        post.u_mean.mul_(0.7)
        post.u_std_raw.copy_(
            torch.tensor([[0.05, 0.3], [0.6, 0.9]]).apply_(inverse_softplus).to(torch.float32)
        )
        post.lamda_raw.fill_(inverse_softplus(lam))
        # a visible diagonal D, so that Sigma_W is well conditioned for the dense densities
        post.d_row_raw.fill_(inverse_softplus(0.5))
        post.d_col_raw.fill_(inverse_softplus(0.5))
    closed = post.kl().item()

    torch.manual_seed(5)
    n = 200_000
    m, s = post.u_mean.detach().double(), post.u_std().detach().double()
    v = m + s * torch.randn(n, *m.shape, dtype=torch.float64)
    q_v = torch.distributions.Normal(m, s).log_prob(v).sum((1, 2))
    p_v = torch.distributions.Normal(0.0, 1.0).log_prob(v).sum((1, 2))
    sigma = post.conditional_covariance().detach().double()
    zero = torch.zeros(sigma.shape[0], dtype=torch.float64)
    q_w = torch.distributions.MultivariateNormal(zero, lam**2 * sigma)
    p_w = torch.distributions.MultivariateNormal(zero, sigma)
    eps = q_w.sample((n,))
    terms = (q_v - p_v) + (q_w.log_prob(eps) - p_w.log_prob(eps))
    mc, stderr = terms.mean().item(), terms.std().item() / math.sqrt(n)
    assert abs(mc - closed) < 4 * stderr + 1e-3 * abs(closed), (mc, closed, stderr)
    # and the closed form is not trivially small next to its parts
    assert closed > 10.0


def test_kl_gradient_reaches_the_posterior_and_lambda_stays_clamped():
    post = small_posterior(seed=6, init_lamda=0.001)
    post.kl().backward()
    assert post.u_mean.grad.abs().max() > 0 and post.u_std_raw.grad.abs().max() > 0
    assert post.lamda_raw.grad.item() < 0  # the KL pulls lambda up towards 1 ...
    with torch.no_grad():
        post.lamda_raw.fill_(5.0)
    assert post.lamda().item() == pytest.approx(1.0)  # ... but never past max_lamda


def test_one_sample_per_sequence_in_independent_mode():
    model, layer = one_layer_bayesian_lora(max_lamda=1.0, max_u_std=1.0)
    spread_out(layer, 0.5, 0.5)
    row = torch.randn(1, 1, 6).expand(1, 4, 6)  # one sequence: the same token four times
    x = torch.cat([row, row]).contiguous()  # two copies of that sequence
    with torch.no_grad(), sampling(model, True, mode="independent"):
        y = model(x)
    # positions of one sequence share one weight sample (a cloze question's options do) ...
    torch.testing.assert_close(y[:, 1:], y[:, :1].expand(-1, 3, -1), rtol=0, atol=1e-6)
    # ... and the two copies are independent samples
    assert (y[0] - y[1]).abs().max() > 1e-3
    with torch.no_grad(), sampling(model, True, mode="shared"):
        y = model(x)
    torch.testing.assert_close(y[0], y[1], rtol=0, atol=1e-6)  # one draw for the batch


@pytest.mark.parametrize("n", [None, 2])
def test_a_sample_has_the_gradients_of_finite_differences_in_every_parameter(n) -> None:
    """The draw is reparameterised: under one seed a sample is a smooth function of every
    parameter (prior structure, q(V), lambda), and backward gives its derivative (checked by
    central differences, each parameter moved along a random direction)."""
    config = BayesianLoraConfig(inducing_rows=3, inducing_cols=2, max_lamda=1.0, max_u_std=1.0)
    torch.manual_seed(0)  # the prior's structure is drawn at construction
    module = InducingWeight(6, 4, config)
    set_spread(module, 0.7, 0.4)  # inside the clamps, which would stop these gradients
    weights = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))

    def objective() -> torch.Tensor:
        torch.manual_seed(5)
        return (module.sample_weight(n) * weights).sum()

    module.zero_grad()
    objective().backward()
    gen = torch.Generator().manual_seed(2)
    for name, p in module.named_parameters():
        direction = torch.randn(p.shape, generator=gen)
        analytic = float((p.grad * direction).sum())
        step = 3e-3  # float32 inside: worst relative error 2.2 % over 20 initialisations
        with torch.no_grad():
            p.add_(step * direction)
            up = float(objective())
            p.sub_(2 * step * direction)
            down = float(objective())
            p.add_(step * direction)
        numeric = (up - down) / (2 * step)
        assert analytic != 0.0, name
        assert abs(analytic - numeric) <= 0.1 * abs(numeric) + 1e-3, (name, analytic, numeric)


def test_jittered_cholesky_is_the_jittered_factor_and_nan_where_it_fails() -> None:
    """It factorises without reading a status back (``cholesky_ex``): the factor of a positive
    definite matrix is ``linalg.cholesky``'s of the jittered one, bit for bit, with its
    gradient; a matrix that is not positive definite gives NaN, which the trainer's
    non-finite-loss check then reports, instead of a silent garbage factor."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    m = z @ z.T  # rank 4 of 9: positive definite only through the jitter
    factor = jittered_cholesky(m, 1e-3)
    eye = torch.eye(9, dtype=torch.float64)
    expected = torch.linalg.cholesky(m + 1e-3 * m.detach().diagonal().mean() * eye)
    assert torch.equal(factor, expected)
    (grad,) = torch.autograd.grad(factor.sum(), z, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected.sum(), z)
    assert torch.equal(grad, expected_grad) and grad.abs().sum() > 0
    batch = torch.stack([m.detach(), -torch.eye(9, dtype=torch.float64)])
    factors = jittered_cholesky(batch, 1e-3)
    assert torch.isfinite(factors[0]).all() and torch.isnan(factors[1]).all()
    assert torch.isnan(jittered_cholesky(-torch.eye(3), 1e-3)).all()


def test_pinned_factors_give_the_same_draws_and_are_reused_until_the_block_ends() -> None:
    """Pinned, a draw without autograd is bit for bit the unpinned draw of the same seed; the
    factorisations are computed once on entry and reused (the same tensors, even after a
    parameter changed inside), a nested block pins its own, a draw with autograd on computes
    its own and differentiates, and leaving restores the state before the block."""
    _, layer = one_layer_bayesian_lora(0)
    posterior = layer.lora_inducing_A["default"]
    set_spread(posterior, 0.02, 0.05)
    with torch.no_grad():
        torch.manual_seed(3)
        reference = posterior.sample_weight(4)
        mean = posterior.mean_weight()
        with posterior.pinned_factors():
            torch.manual_seed(3)
            assert torch.equal(posterior.sample_weight(4), reference)
            assert torch.equal(posterior.mean_weight(), mean)
            pinned = posterior._factors()
            assert len(pinned) == 6
            assert all(a is b for a, b in zip(pinned, posterior._pinned, strict=True))
            posterior.z_row.mul_(2.0)  # the factorisations are not computed again
            assert all(a is b for a, b in zip(pinned, posterior._factors(), strict=True))
            with posterior.pinned_factors():  # nested: pins the changed parameters' own
                assert not torch.equal(posterior._factors()[0], pinned[0])
            assert posterior._factors()[0] is pinned[0]  # the outer pin again
            with torch.enable_grad():
                fresh = posterior.sample_weight(4)
                assert not torch.equal(posterior._factors()[0], pinned[0])
                fresh.sum().backward()
            assert posterior.z_row.grad is not None and posterior.z_row.grad.abs().sum() > 0
        assert posterior._pinned is None
        assert not torch.equal(posterior._factors()[0], pinned[0])  # computed afresh


@pytest.mark.parametrize("rows, cols", [(9, 9), (2, 3)])
def test_factors_are_those_of_separate_float64_factorisations(rows, cols) -> None:
    """The six factors, from one batched factorisation where p == q and from four separate
    ones otherwise, are bit for bit those of the definition computed matrix by matrix."""
    config = BayesianLoraConfig(inducing_rows=rows, inducing_cols=cols)
    torch.manual_seed(0)
    posterior = InducingWeight(7, 11, config)
    with torch.no_grad():
        for p in posterior.parameters():
            p.add_(0.1 * torch.randn_like(p))

    def cholesky(m):
        eye = torch.eye(m.shape[-1], dtype=m.dtype)
        return torch.linalg.cholesky(m + config.jitter * m.diagonal().mean() * eye)

    with torch.no_grad():
        z_row, z_col = posterior.z_row.double(), posterior.z_col.double()
        d_row = torch.nn.functional.softplus(posterior.d_row_raw.double())
        d_col = torch.nn.functional.softplus(posterior.d_col_raw.double())
        l_row = cholesky(z_row @ z_row.T + torch.diag(d_row.square()))
        l_col = cholesky(z_col @ z_col.T + torch.diag(d_col.square()))
        expected = (
            torch.cholesky_solve(z_row, l_row).T,
            torch.cholesky_solve(z_col, l_col),
            l_row,
            l_col,
            cholesky(z_row @ z_row.T),
            cholesky(z_col @ z_col.T),
        )
        got = posterior._factors()
    assert [t.shape for t in got] == [t.shape for t in expected]
    assert all(torch.equal(a, b.float()) for a, b in zip(got, expected, strict=True))
