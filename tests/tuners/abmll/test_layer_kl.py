"""ABMLL's layer and KLs: the LoRA limit, the sampled output's distribution, and the
closed-form KLs against Monte-Carlo estimates."""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model
from torch.distributions import Gamma, Normal

from blob_lora.tuners.abmll import (
    global_posterior,
    hyper_nll,
    task_kl,
    task_posterior,
)
from tests.factories import TARGETS, one_layer_abmll, tiny_abmll_model, tiny_llama
from tests.tuners.abmll.common import IDS, logits

torch.set_num_threads(1)


def test_zero_std_is_plain_lora_bit_for_bit():
    model = tiny_abmll_model(0, std_constant=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_sigma_B" in name:
                p.zero_()
    lora = get_peft_model(
        tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in lora.named_parameters():
            p.copy_(ours[name])
        expected = lora(input_ids=IDS).logits
    for mode in (None, "shared", "independent"):
        assert torch.equal(logits(model, mode, seed=1), expected), mode
    # a task posterior equal to the global pairs goes through the task path: same numbers
    with task_posterior(model, global_posterior(model, detach=True)):
        assert torch.equal(logits(model, "shared", seed=1), expected)
    # and the comparison has teeth: a non-zero std moves the sampled output
    other = tiny_abmll_model(0)
    assert (logits(other, "shared", seed=1) - logits(other, None)).abs().max() > 1e-3


def test_sampled_output_has_the_layer_gaussian():
    """``y = x (W0 + mean + std * E)^T``: per output, mean ``x (W0 + mean)^T + b`` and variance
    ``x^2 (std^2)^T`` (entries independent); 40000 independent draws, one per row."""
    _, layer = one_layer_abmll(0, std_constant=0.05)
    x = torch.randn(1, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean = layer.mean_delta("default", "global")
        std = layer.std_delta("default", "global")
        gen = torch.Generator().manual_seed(2)
        layer.abmll_sampling, layer.abmll_mode, layer.abmll_generator = True, "independent", gen
        y = layer(x.expand(40000, 6))
        layer.abmll_generator = None
        w = layer.base_layer.weight + mean
        mu = x @ w.T + layer.base_layer.bias
        var = x.square() @ std.square().T
    se_mean = (var / 40000).sqrt()
    assert ((y.mean(0) - mu[0]).abs() < 4 * se_mean[0]).all()
    # the sample variance of a Gaussian has relative standard error sqrt(2 / n)
    assert ((y.var(0) / var[0] - 1).abs() < 4 * math.sqrt(2 / 40000)).all()
    assert var.min() > 1e-3  # the noise is really there


def _perturbed_task(model, scale: float = 0.2) -> dict:
    gen = torch.Generator().manual_seed(7)
    return {
        k: v + scale * torch.randn(v.shape, generator=gen) * (v.abs().mean() + 0.05)
        for k, v in global_posterior(model, detach=True).items()
    }


def test_task_kl_matches_monte_carlo():
    model, layer = one_layer_abmll(0, std_constant=0.05)
    post = _perturbed_task(model)
    with torch.no_grad(), task_posterior(model, post):
        closed = task_kl(model)
        q = Normal(layer.mean_delta("default", "task"), layer.std_delta("default", "task").abs())
        p = Normal(
            layer.mean_delta("default", "global"), layer.std_delta("default", "global").abs()
        )
    draws = q.sample((20000,))
    log_ratio = (q.log_prob(draws) - p.log_prob(draws)).sum((1, 2))
    mc, se = log_ratio.mean(), log_ratio.std() / math.sqrt(len(log_ratio))
    assert closed > 1.0  # the task really differs from the prior
    assert abs(closed - mc) < 4 * se, (closed, mc, se)
    # without a task posterior installed there is no task KL
    assert task_kl(model) == 0


def test_hyper_nll_is_minus_log_normal_gamma_density_of_theta():
    """-log p(theta) against torch.distributions' own densities: the prior's mean under
    N(0, s^2) and its precision 1 / sigma^2 under Gamma(shape, rate), entry by entry."""
    model, layer = one_layer_abmll(1, std_constant=0.05, hyper_prior_std=0.5, hyper_rate=0.2)
    with torch.no_grad():
        closed = hyper_nll(model)
        mean = layer.mean_delta("default", "global")
        precision = layer.std_delta("default", "global") ** -2
    expected = -(
        Normal(0.0, 0.5).log_prob(mean).sum()
        + Gamma(torch.tensor(1.0), torch.tensor(0.2)).log_prob(precision).sum()
    )
    assert mean.abs().sum() > 0.1 and precision.std() > 1.0  # a non-trivial theta
    torch.testing.assert_close(closed, expected, rtol=1e-5, atol=1e-3)


def test_hyper_nll_shrinks_the_mean_and_widens_the_std():
    """Its gradient under ABML's Gamma(1, rate): larger stds (lower precision) and smaller
    means are more probable, so a descent step moves theta that way."""
    model, layer = one_layer_abmll(2, std_constant=0.05)
    mean0 = layer.mean_delta("default", "global").detach().abs().sum()
    std0 = layer.std_delta("default", "global").detach().mean()
    hyper_nll(model).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-4 * p.grad / p.grad.abs().max()
    assert layer.mean_delta("default", "global").abs().sum() < mean0
    assert layer.std_delta("default", "global").mean() > std0


def test_kl_gradients_reach_both_sides():
    model, _ = one_layer_abmll(2, std_constant=0.05)
    post = {k: v.detach().requires_grad_(True) for k, v in _perturbed_task(model).items()}
    with task_posterior(model, post):
        kl = task_kl(model)
    kl.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in post.values())
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
