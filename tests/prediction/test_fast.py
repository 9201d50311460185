"""Fast predictive modes: prefix reuse equals the full forward, early stopping's bounds."""

from __future__ import annotations

import warnings

import pytest
import torch

from blob_lora.methods import get_method
from blob_lora.metrics import decompose_uncertainty
from blob_lora.prediction.fast import (
    EarlyStop,
    early_stopped_samples,
    mc_standard_errors,
    plan_prefix,
    predict_batch,
    ragged_decomposition,
    resolve_mode,
)
from blob_lora.utils.errors import ConfigError
from tests.prediction.conftest import blob_model

BLOB = get_method("blob")
OPTION_IDS = torch.tensor([5, 6, 7, 8])


def make_batch(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding on the first row
    option_mask = torch.ones(3, 4, dtype=torch.bool)
    option_mask[1, 3] = False  # a three-option question
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "option_mask": option_mask,
        "labels": torch.tensor([0, 2, 1]),
    }


def run(model, mode: str, n: int = 10, seed: int = 1, fold=None, early=None, method=BLOB):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback in these tests
        resolved = resolve_mode(method, model, mode, n)
    torch.manual_seed(seed)
    return resolved, predict_batch(method, model, make_batch(), OPTION_IDS, resolved, fold, early)


@pytest.mark.parametrize(
    ("blocks", "start", "fold"),
    [(1, 1, None), (1, 1, 3), (0, 2, None)],  # last block + head; head only (prefix = all blocks)
)
def test_prefix_reuse_equals_full_folded_forward_with_same_noise(blocks, start, fold):
    model = blob_model(bayesian_blocks=blocks)
    resolved, prefix = run(model, "prefix", fold=fold)
    assert resolved.mode == "prefix" and resolved.plan.start == start
    _, full = run(model, "fold", fold=fold)
    assert prefix.sample_probs.shape == full.sample_probs.shape == (10, 3, 4)
    # the samples really differ, so equality means the same noise reached the same layers
    assert float(full.sample_probs.std(0).max()) > 0.05
    torch.testing.assert_close(prefix.sample_probs, full.sample_probs, atol=1e-6, rtol=0)
    assert torch.equal(prefix.sample_probs[:, 1, 3], torch.zeros(10, dtype=torch.float64))
    # another seed gives other samples: the comparison is not vacuous
    _, other = run(model, "fold", seed=2, fold=fold)
    assert not torch.allclose(other.sample_probs, full.sample_probs, atol=1e-3)


def test_prefix_restores_the_blocks_and_leaves_the_model_usable():
    model = blob_model(bayesian_blocks=1)
    layers = model.base_model.model.model.layers
    before = list(layers)
    run(model, "prefix")
    assert list(layers) == before
    with torch.no_grad():
        out = model(input_ids=make_batch()["input_ids"]).logits
    assert out.shape == (3, 9, 128)


def test_prefix_plan_and_fallbacks():
    plan, why = plan_prefix(BLOB, blob_model(bayesian_blocks=None))
    assert plan is None and "first block" in why
    with pytest.warns(UserWarning, match="runs as 'fold'"):
        assert resolve_mode(BLOB, blob_model(bayesian_blocks=None), "prefix", 10).mode == "fold"
    lora = get_method("lora")
    with pytest.warns(UserWarning, match="does not say which layers"):
        assert resolve_mode(lora, blob_model(), "prefix", 4).mode == "fold"
    assert resolve_mode(BLOB, blob_model(), "prefix", 0).mode == "mean"
    with pytest.raises(ConfigError, match="unknown predictive mode"):
        resolve_mode(BLOB, blob_model(), "fast", 10)


def test_mean_mode_is_one_deterministic_pass():
    model = blob_model()
    resolved, a = run(model, "mean", seed=1)
    _, b = run(model, "mean", seed=2)
    assert resolved.n_samples == 0 and torch.equal(a.probs, b.probs)
    assert a.aleatoric is None and a.epistemic is None and a.n_used.tolist() == [0, 0, 0]
    torch.testing.assert_close(a.total, -(a.probs * a.probs.clamp_min(1e-300).log()).sum(-1))


def test_early_stopping_stops_after_first_group_when_samples_are_identical():
    # zero std: every sample equals the mean (up to fp32 rounding of the folded batch, ~1e-7)
    model = blob_model(std=(0.0, 0.0))
    rule = EarlyStop(tol=1e-6, min_samples=3, group_size=2)
    for mode in ("early", "prefix-early"):
        resolved, res = run(model, mode, n=10, early=rule)
        assert resolved.mode == mode
        assert res.n_used.tolist() == [3, 3, 3]
        assert float(res.epistemic.max()) < 1e-12


def test_early_stopping_never_exceeds_n_and_tol_zero_uses_all():
    model = blob_model()
    _, res = run(model, "prefix-early", n=7, early=EarlyStop(tol=0.0, min_samples=2, group_size=2))
    assert res.n_used.tolist() == [7, 7, 7]  # groups 2+2+2+1: the last group is cut to fit N
    _, loose = run(model, "early", n=10, early=EarlyStop(tol=10.0, min_samples=4, group_size=3))
    assert loose.n_used.tolist() == [4, 4, 4]


def test_early_stopping_with_a_stub_draw_counts_calls_and_rows():
    calls = []
    row_std = torch.tensor([0.0, 0.3, 0.0, 0.3])  # rows 0 and 2 identical samples

    def draw(rows, m):
        rows = torch.arange(4) if rows is None else rows
        calls.append((rows.tolist(), m))
        noise = torch.randn(m, len(rows), 1) * row_std[rows].view(1, -1, 1)
        p = torch.tensor([0.5, 0.5]) + torch.cat([noise, -noise], -1)
        return p.clamp(0.01, 0.99) / p.clamp(0.01, 0.99).sum(-1, keepdim=True)

    torch.manual_seed(0)
    buf, n_used = early_stopped_samples(draw, 4, 9, 2, EarlyStop(0.01, 3, 2))
    assert n_used.tolist() == [3, 9, 3, 9]
    assert calls[0] == ([0, 1, 2, 3], 3)
    assert all(rows == [1, 3] for rows, _ in calls[1:])
    assert sum(m for _, m in calls) == 9
    assert torch.equal(buf[3:, 0], torch.zeros(6, 2, dtype=torch.float64))


def test_standard_errors_and_ragged_decomposition_match_the_metrics():
    torch.manual_seed(0)
    s = torch.softmax(torch.randn(6, 5, 3, dtype=torch.float64), -1)
    se_top, se_h = mc_standard_errors(s)
    top = s.mean(0).argmax(-1)
    expected = s[:, torch.arange(5), top].std(0) / 6**0.5
    torch.testing.assert_close(se_top, expected)
    assert torch.all(se_h > 0)
    assert torch.equal(
        mc_standard_errors(s[:1].expand(4, -1, -1))[1], torch.zeros(5, dtype=s.dtype)
    )
    n_used = torch.tensor([6, 2, 4, 6, 3])
    buf = s.clone()
    for b, n in enumerate(n_used.tolist()):
        buf[n:, b] = 0
    mean, total, aleatoric, epistemic = ragged_decomposition(buf, n_used)
    for b, n in enumerate(n_used.tolist()):
        ref = decompose_uncertainty(s[:n, b : b + 1])
        torch.testing.assert_close(mean[b], s[:n, b].mean(0))
        for key, value in (("total", total), ("aleatoric", aleatoric), ("epistemic", epistemic)):
            torch.testing.assert_close(value[b], ref[key][0])


def test_early_rule_validation():
    with pytest.raises(ConfigError, match="min_samples must be >= 2"):
        EarlyStop(min_samples=1).validate()
    with pytest.raises(ConfigError, match="tol"):
        EarlyStop(tol=-1).validate()


def test_mc_dropout_prefix_reuse_matches_fold():
    from peft import LoraConfig, get_peft_model

    from tests.factories import tiny_llama

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.3,
        target_modules=r".*layers\.1\.self_attn\.(q_proj|v_proj)|.*lm_head",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(tiny_llama(1), cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    method = get_method("mc-dropout")
    resolved, prefix = run(model, "prefix", n=6, method=method)
    assert resolved.plan.start == 1
    _, full = run(model, "fold", n=6, method=method)
    torch.testing.assert_close(prefix.sample_probs, full.sample_probs, atol=1e-6, rtol=0)
    assert float(full.sample_probs.std(0).max()) > 0.01
