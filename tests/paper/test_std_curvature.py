"""``paper/std_curvature.py`` on a tiny BLoB run: the Fisher along A vanishes with ``B`` (A
acts on the output only through ``B``), the implied std is the prior's there and the formula's
elsewhere, and the run's KL weights give ``n_eff``."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import std_curvature
from blob_lora.models.forward import answer_logits
from blob_lora.training.saved_run import load_run
from blob_lora.tuners.blob import sampling
from std_gradients import training_inputs
from tests.factories import tiny_run_config, train_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory, data_root, char_tok, char_base):
    out = tmp_path_factory.mktemp("curvature") / "run"
    cfg = tiny_run_config(out, data_root, "blob", target_modules=["q_proj", "v_proj", "lm_head"])
    train_tiny(cfg, char_base, char_tok)
    return out


def zero_factor(model, factor: str) -> None:
    """Set every adapted layer's ``lora_<factor>`` to zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".lora_{factor}." in name:
                p.zero_()


def loaded(run, char_base, char_tok):
    return load_run(run, base_model=copy.deepcopy(char_base), tokenizer=char_tok)


def test_fisher_along_a_vanishes_without_b_and_the_std_is_the_prior(blob_run, char_base, char_tok):
    run = loaded(blob_run, char_base, char_tok)
    zero_factor(run.model, "B")
    result = std_curvature.analyse(blob_run, run, examples=4)
    assert result["layers"], "no adapted layer found"
    for row in result["layers"].values():
        assert row["b_rms"] == 0.0
        assert row["fisher_q"] == [0.0, 0.0, 0.0]
        assert row["exact_std_q"] == pytest.approx([result["prior_std"]] * 3)
        assert row["exact_below_90pct"] == 0.0


def test_implied_std_follows_the_fisher_of_the_trained_adapter(blob_run, char_base, char_tok):
    run = loaded(blob_run, char_base, char_tok)
    params = std_curvature.mean_a_parameters(run.model)
    assert any(k.endswith("lm_head") for k in params)
    result = std_curvature.analyse(blob_run, run, examples=4, prior_std=0.2)
    head = next(row for name, row in result["layers"].items() if name.endswith("lm_head"))
    assert head["b_rms"] > 0 and head["fisher_q"][2] > 0  # trained B: A reaches the output
    # the formula, at the largest Fisher: 1 / sqrt(1 / 0.2^2 + n F)
    expected = (1 / 0.2**2 + result["n_train"] * head["fisher_q"][2]) ** -0.5
    assert head["exact_std_q"][0] == pytest.approx(expected, rel=1e-6)
    assert head["learned_std_q"] is not None and result["examples"] == 4


def test_n_eff_is_the_inverse_mean_kl_weight(tmp_path):
    rows = [{"step": 1, "pi": 0.1}, {"step": 2, "pi": 0.3}, {"step": 3, "pi": None}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert std_curvature.kl_examples(tmp_path) == pytest.approx(5.0)
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1, "pi": 0.0}) + "\n")
    assert std_curvature.kl_examples(tmp_path) is None


def test_exact_fisher_of_one_question_by_hand(blob_run, char_base, char_tok):
    """``sum_c p_c g_c^2`` for one question equals the same sum taken option by option."""
    run = loaded(blob_run, char_base, char_tok)
    model = run.model
    params = std_curvature.mean_a_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    inputs = training_inputs(run)
    model.eval()
    with sampling(model, False):
        fisher = std_curvature.fisher_diagonal(model, params, inputs, [0])
        batch = inputs.collator([inputs.dataset[0]])
        by_hand = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        n_options = answer_logits(model, batch, inputs.option_ids).shape[-1]
        for c in range(n_options):
            model.zero_grad(set_to_none=True)
            logp = torch.log_softmax(answer_logits(model, batch, inputs.option_ids)[0].double(), -1)
            logp[c].backward()
            for n, p in params.items():
                by_hand[n] += logp[c].exp().item() * p.grad.double().pow(2)
    for n in params:
        torch.testing.assert_close(fisher[n], by_hand[n])


def test_fisher_along_b_vanishes_without_a(blob_run, char_base, char_tok):
    run = loaded(blob_run, char_base, char_tok)
    zero_factor(run.model, "A")
    result = std_curvature.analyse(blob_run, run, examples=2, factor="B")
    assert result["factor"] == "B" and result["layers"]
    for row in result["layers"].values():
        assert row["fisher_q"] == [0.0, 0.0, 0.0] and "learned_std_q" not in row
