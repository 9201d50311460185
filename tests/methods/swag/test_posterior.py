"""The SWAG posterior on its own: its running moments are the moments of the iterates, its
samples have its mean and covariance, its file restores it bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from blob_lora.methods.swag.binding import adapter_key
from blob_lora.methods.swag.posterior import Layout, SwagPosterior
from blob_lora.utils.errors import CheckpointError

LAYOUT = Layout(("a.lora_A.weight", "a.lora_B.weight"), ((2, 3), (4, 2)))  # P = 14


def iterates(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    drift = torch.linspace(0, 1, n, dtype=torch.float64).unsqueeze(1)  # iterates that move
    return torch.randn(n, LAYOUT.numel, generator=g, dtype=torch.float64) * 0.1 + drift


def collected(x: torch.Tensor, rank: int = 3, scale: float = 0.5) -> SwagPosterior:
    post = SwagPosterior(LAYOUT, rank, scale)
    for theta in x:
        post.collect(theta)
    return post


def test_running_moments_equal_the_moments_of_the_iterates() -> None:
    x = iterates(7)
    post = collected(x, rank=3)
    assert post.count == 7
    torch.testing.assert_close(post.mean, x.mean(0), rtol=0, atol=1e-13)
    torch.testing.assert_close(post.sq_mean, (x * x).mean(0), rtol=0, atol=1e-13)
    torch.testing.assert_close(post.variance(), x.var(0, unbiased=False), rtol=0, atol=1e-12)
    # the last 3 deviations from the running mean at the time of each collection, oldest first
    running = torch.cumsum(x, 0) / torch.arange(1, 8, dtype=torch.float64).unsqueeze(1)
    expected = (x - running)[-3:].to(torch.float32)
    torch.testing.assert_close(post.deviations, expected, rtol=1e-6, atol=1e-7)


def test_fewer_iterates_than_the_rank_keep_them_all() -> None:
    post = collected(iterates(2), rank=5)
    assert post.deviations.shape == (2, LAYOUT.numel)
    # k = 2 deviations: the low-rank part is D^T D / (k - 1)
    d = post.deviations.to(torch.float64)
    torch.testing.assert_close(
        post.covariance(), 0.5 * (torch.diag(post.variance()) + d.T @ d), rtol=0, atol=1e-15
    )


def test_samples_have_the_stored_mean_and_covariance() -> None:
    post = collected(iterates(6), rank=4, scale=0.5)
    sigma = post.covariance()
    k = post.deviations.shape[0]
    d = post.deviations.to(torch.float64)
    torch.testing.assert_close(
        sigma, 0.5 * (torch.diag(post.variance()) + d.T @ d / (k - 1)), rtol=0, atol=1e-15
    )
    n = 40_000
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([post.sample(g) for _ in range(n)])
    # Tolerance: 5 standard errors of each estimate under Gaussian draws. The mean's is
    # sqrt(Sigma_ii / n); a covariance entry's is sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / n).
    # 14 + 196 estimates at 5 SE: a false failure has probability < 1e-4.
    se_mean = (torch.diag(sigma) / n).sqrt()
    assert ((draws.mean(0) - post.mean).abs() <= 5 * se_mean).all()
    emp = torch.cov(draws.T)
    var = torch.diag(sigma)
    se_cov = ((var.unsqueeze(0) * var.unsqueeze(1) + sigma**2) / n).sqrt()
    assert ((emp - sigma).abs() <= 5 * se_cov).all(), (emp - sigma).abs().max()
    # and the low-rank part matters: the diagonal alone would be far off somewhere
    diag_only = torch.diag(0.5 * post.variance())
    assert ((emp - diag_only).abs() > 20 * se_cov).any()


def test_scale_multiplies_the_covariance() -> None:
    x = iterates(5)
    a, b = collected(x, scale=0.5), collected(x, scale=2.0)
    torch.testing.assert_close(b.covariance(), 4 * a.covariance(), rtol=1e-12, atol=0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        b.sample(g2) - b.mean, 2 * (a.sample(g1) - a.mean), rtol=1e-12, atol=1e-15
    )


def test_file_round_trip_is_bit_exact(tmp_path) -> None:
    post = collected(iterates(9), rank=3, scale=0.7)
    post.save(tmp_path / "p.safetensors")
    back = SwagPosterior.load(tmp_path / "p.safetensors")
    assert back.layout == LAYOUT and back.rank == 3 and back.scale == 0.7 and back.count == 9
    for name in ("mean", "sq_mean", "deviations"):
        assert torch.equal(getattr(back, name), getattr(post, name)), name
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(post.sample(g1), back.sample(g2))
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary


def test_damaged_or_missing_file_is_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        SwagPosterior.load(tmp_path / "none.safetensors")
    path = tmp_path / "p.safetensors"
    collected(iterates(3)).save(path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="unreadable"):
        SwagPosterior.load(path)


def test_state_of_another_layout_is_refused() -> None:
    state = collected(iterates(3)).state_tensors()
    other = SwagPosterior(Layout(("x",), ((3,),)), rank=3)
    with pytest.raises(CheckpointError, match="entries"):
        other.load_state_tensors(state)


def test_bad_settings_and_no_iterates() -> None:
    with pytest.raises(ValueError, match="rank"):
        SwagPosterior(LAYOUT, rank=1)
    with pytest.raises(ValueError, match="scale"):
        SwagPosterior(LAYOUT, rank=2, scale=0.0)
    with pytest.raises(RuntimeError, match="no iterate"):
        SwagPosterior(LAYOUT, rank=2).sample()


def test_float64_moments_keep_a_tiny_variance() -> None:
    """Weights of size 1e-2 moving by 1e-5: float32 moments would lose the variance."""
    base = torch.full((LAYOUT.numel,), 1e-2, dtype=torch.float64)
    steps = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64) * 1e-5
    post = collected(torch.stack([base + s for s in steps]))
    torch.testing.assert_close(post.variance(), torch.full_like(base, 1e-10), rtol=1e-6, atol=0)
    assert math.isclose(float(post.mean[0]), 1e-2, rel_tol=1e-12)


def test_adapter_key_drops_only_the_adapter_segment() -> None:
    name = "base_model.model.layers.0.q_proj.lora_A.default.weight"
    assert adapter_key(name, "default") == "base_model.model.layers.0.q_proj.lora_A.weight"
    assert adapter_key(name.replace("default", "m1"), "m1") == adapter_key(name, "default")
    assert adapter_key(name, "m1") is None
    assert adapter_key("base_model.model.layers.0.q_proj.base_layer.weight", "default") is None
    emb = "base_model.model.embed_tokens.lora_embedding_A.default"
    assert adapter_key(emb, "default") == "base_model.model.embed_tokens.lora_embedding_A"
