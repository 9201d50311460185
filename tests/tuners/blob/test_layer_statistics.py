"""The sampled layer output has the analytic mean and variance in every noise mode."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from blob_lora import BlobConfig, get_blob_model, kl_divergence, sampling
from blob_lora.tuners.blob.kl import gaussian_kl
from blob_lora.tuners.blob.layer import BlobLinear
from tests.factories import one_layer_model


@pytest.mark.parametrize(
    "mode", ["token", "sequence", "shared", "independent", "independent-token"]
)
def test_output_mean_and_variance_match_analytic(mode: str) -> None:
    predictive = mode.startswith("independent")  # prediction-only modes, set as an override
    model, layer = one_layer_model("token" if predictive else mode)
    torch.manual_seed(1)
    x = torch.randn(6)
    # Flipout shares one noise magnitude per forward call, so the marginal statistics need many
    # independent calls: 3000 calls of 4 one-token sequences each.
    calls, batch = 3000, 4
    xs = x.expand(batch, 1, 6).contiguous()
    override = mode if predictive else None
    with torch.no_grad(), sampling(model, True, mode=override):
        outs = torch.cat([model(xs).view(batch, -1) for _ in range(calls)])
        w0 = layer.base_layer.weight
        b0 = layer.base_layer.bias
        s = layer.scaling["default"]
        a_mean = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        std = layer.lora_A_std("default")
        mean = w0 @ x + b0 + s * b @ (a_mean @ x)
        var = s**2 * (b**2) @ ((std**2) @ (x**2))
    se_mean = (var / calls).sqrt()
    assert torch.all((outs.mean(0) - mean).abs() < 5 * se_mean + 1e-5)
    # Relative standard error of a variance estimate from `calls` independent draws ~ sqrt(2/calls).
    rel = (outs.var(0) / var - 1).abs()
    assert torch.all(rel < 5 * (2 / calls) ** 0.5), rel


def test_token_mode_differs_between_tokens_sequence_mode_does_not() -> None:
    x = torch.randn(6).expand(3, 4, 6).contiguous()  # 3 sequences of 4 identical tokens
    for mode, tokens_equal in (("token", False), ("sequence", True)):
        model, _ = one_layer_model(mode)
        with torch.no_grad():
            out = model(x)
        seq_equal = torch.allclose(out[0], out[1])
        assert not seq_equal, f"{mode}: sequences of a batch must get different samples"
        # atol: the batched matmul may round rows of one sequence differently (~1e-6 at this
        # scale); a different sign pattern moves outputs by O(1) here (init_std 0.5)
        same = torch.allclose(out[:, :1].expand_as(out), out, rtol=1e-5, atol=1e-4)
        assert same == tokens_equal, mode


def test_shared_mode_one_sample_per_batch_and_calls_differ() -> None:
    model, _ = one_layer_model("shared")
    x = torch.randn(6).expand(3, 2, 6).contiguous()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.allclose(first[0], first[1])
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("mode", ["token", "sequence", "shared"])
def test_gradients_reach_mean_b_and_std(mode: str) -> None:
    model, layer = one_layer_model(mode)
    out = model(torch.randn(2, 3, 6)).pow(2).sum()
    out.backward()
    for p in (
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_A_rho["default"],
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_token_flipout_gradient_matches_autograd_reference() -> None:
    from blob_lora.tuners.blob.noise import _signs_from_seed, _TokenFlipout, random_signs

    torch.manual_seed(3)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = random_signs((2, 3, 4), x.device, torch.float64)
    assert torch.autograd.gradcheck(lambda a, d: _TokenFlipout.apply(a, d, 1234, t), (x, delta))
    # The regenerated signs are the forward's: compare with the explicit expression.
    r = _signs_from_seed(1234, (2, 3, 6), x.device).to(torch.float64)
    ref = torch.nn.functional.linear(x * r, delta) * t
    assert torch.equal(_TokenFlipout.apply(x, delta, 1234, t), ref)
    assert set(r.unique().tolist()) == {-1.0, 1.0}


def test_kl_closed_form_matches_monte_carlo() -> None:
    torch.manual_seed(0)
    mean = torch.randn(50, dtype=torch.float64) * 0.3
    std = torch.rand(50, dtype=torch.float64) * 0.3 + 0.05
    prior = 0.2
    closed = gaussian_kl(mean, std, prior)
    q = torch.distributions.Normal(mean, std)
    p = torch.distributions.Normal(torch.zeros_like(mean), prior)
    samples = q.sample((200000,))
    mc = (q.log_prob(samples) - p.log_prob(samples)).sum(-1).mean()
    ref = torch.distributions.kl_divergence(q, p).sum()
    assert torch.allclose(closed, ref, rtol=1e-10)
    assert abs(closed.item() - mc.item()) < 0.01 * closed.item()


@pytest.mark.parametrize("std_param", ["square", "softplus"])
def test_model_kl_sums_layers_and_is_differentiable(std_param: str, tiny_model) -> None:
    model = get_blob_model(
        tiny_model,
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]),
        BlobConfig(std_param=std_param),
    )
    kl = kl_divergence(model)
    expected = 0.0
    for module in model.modules():
        if isinstance(module, BlobLinear):
            std = module.lora_A_std("default")
            assert std.min() >= 0.05**2 / 2 - 1e-7 and std.max() <= 0.05**2 + 1e-7
            expected += gaussian_kl(module.lora_A["default"].weight, std, 0.2).item()
    assert kl.dim() == 0 and kl.requires_grad
    assert abs(kl.item() - expected) < 1e-3 * abs(expected)
    kl.backward()
    rho = next(p for n, p in model.named_parameters() if "lora_A_rho" in n)
    assert rho.grad is not None and rho.grad.abs().sum() > 0


def test_token_flipout_kept_and_regenerated_signs_give_identical_gradients(monkeypatch) -> None:
    """On the CPU the forward's signs are kept for backward instead of drawn again from the
    seed; both ways give bit-identical values and gradients, and keeping draws them once."""
    from blob_lora.tuners.blob import noise

    torch.manual_seed(4)
    x0 = torch.randn(3, 5, 7)
    d0 = torch.randn(4, 7)
    t = noise.random_signs((3, 5, 4), x0.device, x0.dtype)
    draws = []
    real_draw = noise._signs_from_seed

    def counting(seed, shape, device):
        draws.append(seed)
        return real_draw(seed, shape, device)

    monkeypatch.setattr(noise, "_signs_from_seed", counting)

    def run() -> tuple[torch.Tensor, ...]:
        x, d = x0.clone().requires_grad_(), d0.clone().requires_grad_()
        out = noise._TokenFlipout.apply(x, d, 99, t)
        out.pow(2).sum().backward()
        return out.detach(), x.grad, d.grad

    assert noise._keeps_token_signs(x0.device)
    kept = run()
    assert draws == [99]  # drawn in forward only
    monkeypatch.setattr(noise, "_keeps_token_signs", lambda device: False)
    regenerated = run()
    assert draws == [99, 99, 99]  # forward and backward
    for a, b in zip(kept, regenerated, strict=True):
        assert torch.equal(a, b)
