"""Laplace-LoRA on a tiny random PEFT Llama: sequence positions, left padding, the lm_head
row support, masked options and persistence through safetensors."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from blob_lora.methods.laplace import LaplaceLoRA
from blob_lora.utils.errors import CheckpointError
from tests.factories import tiny_llama

torch.set_num_threads(1)
OPTION_IDS = torch.tensor([11, 42, 97])
VOCAB = 128


def option_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Last-position logits at the option tokens; options beyond ``n_options`` are masked."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1
    )
    logits = out.logits[:, -1, :][:, OPTION_IDS.to(out.logits.device)]
    if "n_options" in batch:
        keep = (
            torch.arange(logits.shape[1], device=logits.device)[None, :]
            < batch["n_options"][:, None]
        )
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


@pytest.fixture(scope="module")
def peft_model() -> torch.nn.Module:
    # grouped-query attention (2 key/value heads), in training mode as PEFT leaves it
    base = tiny_llama(0, VOCAB, num_key_value_heads=2, max_position_embeddings=64).train()
    model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"]
        ),
    )
    with torch.no_grad():  # non-zero lora_B, as after training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def left_padded(
    lengths: list[int], labels: list[int], seed: int, n_options: list[int] | None = None
) -> dict:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, width - n :] = 1
    b = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}
    if n_options is not None:
        b["n_options"] = torch.tensor(n_options)
    return b


TRAIN = [
    left_padded([5, 8, 3], [0, 2, 1], seed=1),
    left_padded([6, 4], [1, 0], seed=2, n_options=[2, 3]),
]
TEST = left_padded([7, 4, 6], [0, 0, 0], seed=3, n_options=[3, 2, 3])


def lm_head_lora_b(la: LaplaceLoRA) -> str:
    (name,) = [n for n in la.layers if "lm_head" in n and "lora_B" in n]
    return name


def test_fit_predict_and_lm_head_support(peft_model: torch.nn.Module) -> None:
    la = LaplaceLoRA(peft_model, option_logits)
    # 2 layers x (q, v) x (A, B) + lm_head (A, B)
    assert len(la.modules) == 10
    la.fit(TRAIN)
    assert la.n_data == 5
    layer = la.layers[lm_head_lora_b(la)]
    assert layer.out_dim == VOCAB
    assert torch.equal(layer.g_support, OPTION_IDS)  # G stored on the 3 option rows only
    assert layer.g_vecs.shape == (3, 3) and layer.a_vecs.shape == (4, 4)
    q_b = la.layers[next(n for n in la.layers if "q_proj" in n and "lora_B" in n)]
    assert q_b.g_support.numel() == 32  # ordinary layers: full support
    # q_proj and v_proj lora_A read the same tensor: one A factor, decomposed once.
    q_a = next(n for n in la.layers if "q_proj" in n and "lora_A" in n)
    assert la.layers[q_a].a_vecs is la.layers[q_a.replace("q_proj", "v_proj")].a_vecs

    best = la.optimize_prior_precision()
    assert math.isfinite(la.log_marginal_likelihood(best))

    probs = la.predictive(TEST)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    assert probs[1, 2] == 0
    mc = la.predictive(TEST, n_samples=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc.sum(-1), torch.ones(3))
    assert mc[1, 2] == 0
    samples = la.predictive_samples(TEST, 5)
    assert samples.shape == (5, 3, 3) and (samples[:, 1, 2] == 0).all()

    mean, cov = la.predictive_logit_moments(TEST)
    with torch.no_grad():
        torch.testing.assert_close(mean, option_logits(peft_model, TEST))
    assert (cov.diagonal(dim1=1, dim2=2)[[0, 0, 0, 1, 1, 2], [0, 1, 2, 0, 1, 2]] > 0).all()
    assert all(p.grad is None for p in peft_model.parameters())  # fit does not touch .grad


def test_train_mode_is_restored(peft_model: torch.nn.Module) -> None:
    peft_model.train()
    try:
        la = LaplaceLoRA(peft_model, option_logits)
        la.fit(TRAIN[:1])
        la.predictive(TEST)
        assert all(m.training for m in peft_model.modules())
    finally:
        peft_model.eval()


def dense_covariance(la: LaplaceLoRA, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """J Σ Jᵀ with J from per-example autograd over the LoRA weights and Σ the dense inverse of
    the block-diagonal KFAC precision rebuilt from the stored eigenpairs (prior outside them)."""
    names = list(la.layers)
    weights = [la.modules[n].weight for n in names]
    logits = option_logits(model, batch)
    rows = []
    for b in range(logits.shape[0]):
        per_class = []
        for c in range(logits.shape[1]):
            grads = torch.autograd.grad(logits[b, c], weights, retain_graph=True)
            per_class.append(torch.cat([g.flatten() for g in grads]).double())
        rows.append(torch.stack(per_class))
    jac = torch.stack(rows)  # (B, C, P)
    blocks = []
    for n in names:
        layer = la.layers[n]
        a = layer.a_vecs @ torch.diag(layer.a_vals) @ layer.a_vecs.T
        g_sup = layer.g_vecs @ torch.diag(layer.g_vals) @ layer.g_vecs.T
        g = torch.zeros(layer.out_dim, layer.out_dim, dtype=torch.float64)
        g[layer.g_support[:, None], layer.g_support[None, :]] = g_sup
        prec = la.n_data / la.temperature * torch.kron(g, a)
        prec += la.prior_precision * torch.eye(prec.shape[0], dtype=torch.float64)
        blocks.append(torch.linalg.inv(prec))
    sigma = torch.block_diag(*blocks)
    cov = torch.einsum("bcp,pq,bdq->bcd", jac, sigma, jac)
    masked = torch.isneginf(logits.detach())
    return cov.masked_fill(masked[:, :, None] | masked[:, None, :], 0.0)


TWO_OPTIONS_ONLY = [left_padded([5, 6], [0, 1], seed=4, n_options=[2, 2])]


@pytest.mark.parametrize(
    ("max_rank", "train"),
    [(None, TRAIN), (2, TRAIN), (None, TWO_OPTIONS_ONLY)],
    ids=["full", "rank2", "unseen-option"],
)
def test_jacobian_path_matches_dense_autograd(
    peft_model: torch.nn.Module, max_rank: int | None, train: list[dict]
) -> None:
    """Sequence positions, the lm_head row support and the prior-only directions (eigenpairs
    dropped by max_rank=2; an option row never seen in training), against a dense computation
    with the same KFAC factors."""
    la = LaplaceLoRA(peft_model, option_logits, prior_precision=0.5, max_rank=max_rank)
    la.fit(train)
    if train is TWO_OPTIONS_ONLY:
        assert torch.equal(la.layers[lm_head_lora_b(la)].g_support, OPTION_IDS[:2])
    _, cov = la.predictive_logit_moments(TEST)
    ref = dense_covariance(la, peft_model, TEST)
    torch.testing.assert_close(cov.double(), ref, rtol=1e-4, atol=1e-6)


def test_padding_does_not_change_the_fit(peft_model: torch.nn.Module) -> None:
    """The same examples with extra left padding give the same factors and evidence (Llama's
    rotary positions shift uniformly, which attention does not see)."""
    la1 = LaplaceLoRA(peft_model, option_logits)
    la1.fit([TRAIN[0]])
    wide = dict(TRAIN[0])
    wide["input_ids"] = torch.cat([torch.full((3, 4), 5), TRAIN[0]["input_ids"]], 1)
    wide["attention_mask"] = torch.cat(
        [torch.zeros(3, 4, dtype=torch.long), TRAIN[0]["attention_mask"]], 1
    )
    la2 = LaplaceLoRA(peft_model, option_logits)
    la2.fit([wide])
    for delta in (0.1, 10.0):
        assert la2.log_marginal_likelihood(delta) == pytest.approx(
            la1.log_marginal_likelihood(delta), rel=1e-4
        )


def test_state_dict_round_trip_through_safetensors(peft_model: torch.nn.Module, tmp_path) -> None:
    la = LaplaceLoRA(peft_model, option_logits)
    la.fit(TRAIN)
    la.optimize_prior_precision([0.1, 1.0, 10.0])
    path = tmp_path / "laplace.safetensors"
    save_file(la.state_dict(), str(path))
    restored = LaplaceLoRA(peft_model, option_logits)
    restored.load_state_dict(load_file(str(path)))
    assert restored.prior_precision == la.prior_precision
    assert restored.n_data == la.n_data
    assert restored.log_marginal_likelihood() == pytest.approx(
        la.log_marginal_likelihood(), rel=1e-12
    )
    torch.testing.assert_close(restored.predictive(TEST), la.predictive(TEST))
    assert path.stat().st_size < 200_000

    sd = la.state_dict()
    sd.pop(next(k for k in sd if k.endswith("G_vecs")))
    with pytest.raises(CheckpointError):
        restored.load_state_dict(sd)
    other = dict(la.state_dict())
    other["layers.nonexistent.dims"] = torch.tensor([1, 1])
    with pytest.raises(CheckpointError):
        restored.load_state_dict(other)
