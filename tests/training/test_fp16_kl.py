"""fp16 loss scaling leaves the KL's share of the update intact (issue 21, item A).

Accelerate refuses fp16 on CPU (no GradScaler there), so the tests give a plain CPU
``Accelerator`` a real ``torch.amp.GradScaler("cpu")``: ``accelerator.backward`` then scales the
loss and ``accelerator.prepare_optimizer`` wraps the optimisers with that scaler, exactly the
code paths of an fp16 run on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from blob_lora import BlobConfig, get_blob_model, kl_divergence
from blob_lora.training.optim import build_updater
from tests.factories import tiny_llama

PI = 0.25


@pytest.fixture(autouse=True)
def one_thread():
    # Two intra-op threads on a busy 2-core machine make this tiny model 100x slower.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator()


def _model():
    model = get_blob_model(
        tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), BlobConfig()
    )
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _step(accelerator, scale, *, mode="paper", nll_weight=1.0, scaler_kwargs=None, corrupt=None):
    """One optimiser step; returns (trainable tensors before, after, the scaler)."""
    model = _model()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    updater = build_updater(
        model, mode=mode, bayesian=True, lr=1e-2, total_steps=10, warmup_ratio=0.0, kl_lr=0.5
    )
    scaler = None
    if scale is not None:
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, **(scaler_kwargs or {}))
    accelerator.scaler = scaler  # what Accelerator(mixed_precision="fp16") sets on a GPU
    try:
        updater.optimizers = [accelerator.prepare_optimizer(o) for o in updater.optimizers]
        torch.manual_seed(2)  # the same weight noise and data in every run
        ids = torch.randint(0, 128, (2, 6))
        loss = nll_weight * model(ids).logits[:, -1].logsumexp(-1).mean()
        if mode == "single":
            loss = loss + PI * kl_divergence(model)
        accelerator.backward(loss)
    finally:
        accelerator.scaler = None
    if corrupt is not None:
        params[corrupt].grad[0, 0] = float("inf")
    kl_fn = None if mode == "single" else (lambda: kl_divergence(model))
    updater.step(kl_fn, PI)
    after = {n: p.detach().clone() for n, p in params.items()}
    return before, after, scaler


def _delta(before, after, key):
    return {n: after[n] - before[n] for n in before if key in n}


def test_pure_kl_step_moves_the_std_the_same_at_any_loss_scale(accelerator) -> None:
    """NLL gradient zero: the std moves only by the KL's SGD step, whatever the scale."""
    b0, fp32, _ = _step(accelerator, None, nll_weight=0.0)
    _, s1, _ = _step(accelerator, 1.0, nll_weight=0.0)
    _, s1024, _ = _step(accelerator, 1024.0, nll_weight=0.0)
    rho = [n for n in b0 if "lora_A_rho" in n]
    assert rho
    for n in rho:
        step = fp32[n] - b0[n]
        assert step.abs().max() > 1e-4, n  # the KL moved the std
        # a power-of-two scale is exact in fp32: the same update bit for bit
        torch.testing.assert_close(s1[n] - b0[n], step, rtol=0, atol=0)
        torch.testing.assert_close(s1024[n] - b0[n], step, rtol=0, atol=0)
    for n in b0:  # mean and B too: SGD on the KL only
        torch.testing.assert_close(s1024[n], fp32[n], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["paper", "single"])
def test_nll_plus_kl_update_is_independent_of_the_loss_scale(accelerator, mode) -> None:
    before, fp32, _ = _step(accelerator, None, mode=mode)
    _, scaled, scaler = _step(accelerator, 65536.0, mode=mode)
    assert scaler.get_scale() == 65536.0  # no growth after one step (interval 2000)
    for n in before:
        assert not torch.equal(fp32[n], before[n]), n
        torch.testing.assert_close(scaled[n], fp32[n], rtol=0, atol=0)


def test_fp32_path_is_the_plain_update(accelerator) -> None:
    """Without a scaler (fp32, bf16) the prepared optimisers give the unprepared result."""
    model = _model()
    updater = build_updater(model, mode="paper", bayesian=True, lr=1e-2, total_steps=10)
    assert updater.grad_scaler() is None
    prepared = [accelerator.prepare_optimizer(o) for o in updater.optimizers]
    assert all(getattr(o, "scaler", None) is None for o in prepared)
    updater.optimizers = prepared
    assert updater.grad_scaler() is None
    updater.scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert updater.grad_scaler() is None


def test_scaler_updates_once_and_an_overflow_skips_only_its_optimizer(accelerator) -> None:
    # growth_interval 1: one good iteration doubles the scale exactly once.
    _, _, scaler = _step(accelerator, 1024.0, scaler_kwargs={"growth_interval": 1})
    assert scaler.get_scale() == 2048.0
    # an inf in a std gradient: the SGD step is skipped (std and the KL step on mean/B), AdamW
    # still steps mean/B on the NLL, and the scale backs off once.
    before, fp32, _ = _step(accelerator, None)
    rho = next(n for n in before if "lora_A_rho" in n)
    _, after, scaler = _step(accelerator, 1024.0, corrupt=rho)
    assert scaler.get_scale() == 512.0
    for n in before:
        if "lora_A_rho" in n:
            assert torch.equal(after[n], before[n]), n
        elif "lora_A." in n:  # AdamW on the NLL, without the (skipped) KL step
            assert not torch.equal(after[n], before[n]), n
            assert not torch.allclose(after[n], fp32[n], rtol=1e-5, atol=1e-7), n
        else:  # B has no KL gradient: AdamW only, as in fp32
            torch.testing.assert_close(after[n], fp32[n], rtol=1e-5, atol=1e-7)
