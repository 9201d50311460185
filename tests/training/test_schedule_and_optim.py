"""KL schedules and the two optimisation modes update exactly what they should."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig

from blob_lora import BlobConfig, get_blob_model, kl_divergence
from blob_lora.training.kl_schedule import KLSchedule, make_schedule, rescaled_cycle_length
from blob_lora.training.optim import build_updater
from tests.factories import tiny_llama


def test_geometric_schedule_values_for_small_cycle() -> None:
    s = KLSchedule("geometric", cycle=3, n_train=100)
    assert [s.weight(i) for i in range(1, 7)] == pytest.approx(
        [2 / 15, 4 / 15, 8 / 15, 2 / 15, 4 / 15, 8 / 15], abs=1e-15
    )
    big = KLSchedule("geometric", cycle=2000, n_train=100)
    assert big.weight(2000) == pytest.approx(0.5, rel=1e-12)
    assert big.weight(1) == 0.0 or big.weight(1) < 1e-300
    assert sum(big.weight(i) for i in range(1, 2001)) == pytest.approx(1.0, rel=1e-9)


def test_uniform_and_elbo_schedules() -> None:
    assert KLSchedule("uniform", cycle=4, n_train=10).weight(7) == 0.25
    assert KLSchedule("elbo", cycle=4, n_train=10).weight(3) == 0.1


def test_dataset_rescaling_matches_authors_formula() -> None:
    # K = int(100 * n^(pi/gamma) / (world_size * batch_size)), paper: 2 GPUs x batch 4.
    assert rescaled_cycle_length(640, 8) == int(100 * 640 ** (math.pi / 8) / 8)
    assert make_schedule("geometric", 640, 80, 8, rescale=False).cycle == 80
    assert make_schedule("geometric", 640, 80, 8, rescale=True).cycle == rescaled_cycle_length(
        640, 8
    )
    with pytest.raises(ValueError, match="kl_schedule"):
        KLSchedule("cosine", 3, 10)


def _model_and_grads(seed: int = 0):
    model = get_blob_model(
        tiny_llama(seed), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), BlobConfig()
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ids = torch.randint(0, 128, (2, 6))
    nll = model(ids).logits[:, -1].logsumexp(-1).mean()
    nll.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model, params


def test_paper_mode_updates() -> None:
    """AdamW on NLL for mean and B; SGD on pi*KL for all; std only by SGD on NLL+KL."""
    model, params = _model_and_grads()
    before = {n: p.detach().clone() for n, p in params.items()}
    nll_grads = {n: p.grad.detach().clone() for n, p in params.items()}
    upd = build_updater(
        model, mode="paper", bayesian=True, lr=1e-2, total_steps=10, warmup_ratio=0.0, kl_lr=0.5
    )
    pi = 0.3
    upd.step(lambda: kl_divergence(model), pi)
    # Expected: the std parameters follow plain SGD on NLL + pi*KL (at the pre-step values).
    rho_names = [n for n in params if "lora_A_rho" in n]
    mean_names = [n for n in params if "lora_A." in n]
    b_names = [n for n in params if "lora_B." in n]
    for n in rho_names:
        rho0 = before[n].requires_grad_(True)
        std = rho0 * rho0
        kl = (math.log(0.2) - torch.log(std) + std**2 / (2 * 0.04)).sum()
        (g_kl,) = torch.autograd.grad(kl, rho0)
        expected = before[n] - 0.5 * (nll_grads[n] + pi * g_kl)
        assert torch.allclose(params[n].detach(), expected, atol=1e-6), n
    # B moves by AdamW only: a first AdamW step is -lr * g / (|g| + eps).
    for n in b_names:
        g = nll_grads[n]
        expected = before[n] - 1e-2 * g / (g.abs() + 1e-6)
        assert torch.allclose(params[n].detach(), expected, atol=1e-7), n
    # The mean gets AdamW's step plus SGD on pi * M / sigma_p^2.
    for n in mean_names:
        g = nll_grads[n]
        after_adam = before[n] - 1e-2 * g / (g.abs() + 1e-6)
        expected = after_adam - 0.5 * pi * after_adam / 0.04
        assert torch.allclose(params[n].detach(), expected, atol=1e-5), n
    assert all(p.grad is None for p in params.values())


def test_single_mode_uses_one_adamw_with_std_group() -> None:
    model, params = _model_and_grads()
    upd = build_updater(
        model, mode="single", bayesian=True, lr=1e-3, std_lr=5e-2, total_steps=10, warmup_ratio=0.0
    )
    assert len(upd.optimizers) == 1
    groups = upd.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [1e-3, 5e-2]
    std_ids = {id(p) for n, p in params.items() if "lora_A_rho" in n}
    assert {id(p) for p in groups[1]["params"]} == std_ids
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    upd.step(None, 0.0)
    for n, p in params.items():
        # A first AdamW step moves each entry by lr * g / (|g| + eps) against its gradient.
        lr = 5e-2 if "lora_A_rho" in n else 1e-3
        expected = before[n] - lr * grads[n] / (grads[n].abs() + 1e-6)
        assert torch.allclose(p.detach(), expected, atol=1e-7), n


def test_lora_method_gets_plain_adamw() -> None:
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj"]))
    upd = build_updater(
        model, mode="paper", bayesian=False, lr=1e-3, total_steps=5, weight_decay=1e-2
    )
    assert len(upd.optimizers) == 1 and isinstance(upd.optimizers[0], torch.optim.AdamW)
    assert upd.optimizers[0].param_groups[0]["weight_decay"] == 1e-2
    with pytest.warns(
        UserWarning, match="no-op"
    ):  # the paper's MAP strength, as the trainer sees it
        build_updater(
            model, mode="paper", bayesian=False, lr=1e-3, total_steps=5, weight_decay=1e-5
        )


def _adamw_steps(weight_decay: float, lr: float) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 16))
    opt = torch.optim.AdamW([w], lr=lr, eps=1e-6, weight_decay=weight_decay)
    for step in range(5):
        opt.zero_grad()
        (w.sin() * (step + 1)).sum().backward()
        opt.step()
    return w.detach()


def test_tiny_weight_decay_is_a_bitwise_no_op_and_warns() -> None:
    """The paper's MAP (wd 1e-5) at lr 1e-3: AdamW's factor 1 - 1e-8 is 1.0 in fp32."""
    import warnings

    from blob_lora.training.optim import warn_if_decay_rounds_away

    assert torch.equal(_adamw_steps(1e-5, 1e-3), _adamw_steps(0.0, 1e-3))
    assert not torch.equal(_adamw_steps(1e-2, 1e-3), _adamw_steps(0.0, 1e-3))
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.warns(UserWarning, match=r"weight decay 1e-05 at peak lr 0.001 is a no-op"):
        warn_if_decay_rounds_away(params, 1e-3, 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_decay_rounds_away(params, 1e-3, 1e-2)  # 1e-5 > 2^-24: it acts
        warn_if_decay_rounds_away(params, 1e-3, 0.0)
        # fp64 keeps a 1 - 1e-8 factor: only the dtypes of the weights present count
        warn_if_decay_rounds_away(
            [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], 1e-3, 1e-5
        )


def _lr_trace(upd, steps: int) -> list[list[float]]:
    """Learning rate of every optimiser at each of ``steps`` updates (no gradients: no moves)."""
    import warnings

    trace = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
        for _ in range(steps):
            trace.append([o.param_groups[0]["lr"] for o in upd.optimizers])
            for sched in upd.schedulers:
                sched.step()
    return trace


@pytest.mark.parametrize(("total", "ratio"), [(100, 0.06), (10, 0.06), (50, 0.1), (20, 0.0)])
def test_paper_mode_warmup_is_the_authors(total, ratio) -> None:
    """``--optimizer paper``: the authors' ``get_linear_schedule_with_warmup`` (the same as
    transformers'): factor ``s / W`` with ``W = ratio * total`` unrounded, so the first update
    is at lr 0, on AdamW and on the KL SGD alike; LoRA-like methods get it too."""
    import warnings

    from transformers import get_linear_schedule_with_warmup

    model, _ = _model_and_grads()
    upd = build_updater(
        model, mode="paper", bayesian=True, lr=1e-2, total_steps=total, warmup_ratio=ratio
    )
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() before optimizer.step()
        ref = get_linear_schedule_with_warmup(ref_opt, ratio * total, total)
        expected = []
        for _ in range(total):
            expected.append(ref_opt.param_groups[0]["lr"])
            ref.step()
    trace = _lr_trace(upd, total)
    assert [t[0] for t in trace] == pytest.approx([1e-2 * f for f in expected], abs=1e-15)
    assert [t[1] for t in trace] == pytest.approx([0.01 * f for f in expected], abs=1e-15)
    if ratio > 0:
        assert trace[0] == [0.0, 0.0]  # the first update is taken at lr 0
    if (total, ratio) == (100, 0.06):  # W = 6: 0, 1/6, ..., 5/6, then 94/94, 93/94, ...
        assert [t[0] / 1e-2 for t in trace[:8]] == pytest.approx(
            [0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 93 / 94]
        )
    from peft import get_peft_model

    plain = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj"]))
    lora = build_updater(
        plain, mode="paper", bayesian=False, lr=1e-2, total_steps=total, warmup_ratio=ratio
    )
    assert [t[0] for t in _lr_trace(lora, total)] == [t[0] for t in trace]


def test_single_mode_warmup_is_unchanged() -> None:
    """``--optimizer single`` keeps ``(s + 1) / W`` with ``W`` rounded: 1/6, 2/6, ..., 1."""
    model, _ = _model_and_grads()
    upd = build_updater(
        model, mode="single", bayesian=True, lr=1.0, total_steps=100, warmup_ratio=0.06
    )
    trace = [t[0] for t in _lr_trace(upd, 8)]
    assert trace == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0, 93 / 94])
