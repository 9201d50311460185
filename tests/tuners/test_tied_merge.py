"""Merging a custom tuner's adapter on an output head tied to the input embedding.

Why: SmolLM2 (the embedded default) ties ``lm_head`` to ``embed_tokens`` and ``lm_head`` is a
default target. PEFT merges in place, so before, ``merge_and_unload`` added the head's delta to
the input embedding too, and the merged model's logits were off by ~10 from the adapter's.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from blob_lora import BlobConfig, get_blob_model
from blob_lora.tuners.abmll import AbmllConfig, get_abmll_model
from blob_lora.tuners.abmll.model import sampling as abmll_sampling
from blob_lora.tuners.bayesian_lora import BayesianLoraConfig, get_bayesian_lora_model
from blob_lora.tuners.bayesian_lora.model import sampling as bl_sampling
from blob_lora.tuners.blob.model import sampling as blob_sampling
from blob_lora.tuners.tied_weights import PEFT_TIED_WARNINGS, mark_shared_base_weights
from tests.factories import TARGETS, draw_adapter_weights, tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))

TUNERS = {
    "blob": (get_blob_model, BlobConfig(), blob_sampling),
    "bayesian-lora": (get_bayesian_lora_model, BayesianLoraConfig(), bl_sampling),
    "abmll": (get_abmll_model, AbmllConfig(), abmll_sampling),
}


def tied_base():
    base = tiny_llama(0, tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    return base


def adapted(name: str, base=None):
    """The tuner on q/v/lm_head of a tied tiny Llama, its adapter drawn as after training,
    built with warnings recorded; (model, PEFT's tied-module warnings seen)."""
    build, options, _ = TUNERS[name]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = draw_adapter_weights(build(tied_base() if base is None else base, lora, options))
    return model, tied_warnings(seen)


def tied_warnings(seen: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in seen
        if any(re.search(p, str(w.message)) for p in PEFT_TIED_WARNINGS)
    ]


def embedding(model) -> torch.nn.Parameter:
    return model.get_input_embeddings().weight


def mean_logits(name: str, model) -> torch.Tensor:
    with torch.no_grad(), TUNERS[name][2](model, False):
        return model(IDS).logits


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_merge_and_unload_puts_the_heads_delta_in_the_head_alone(name: str) -> None:
    model, built_warnings = adapted(name)
    original = embedding(model).detach().clone()
    mean = mean_logits(name, model)
    assert (mean - tied_base()(IDS).logits).abs().max() > 1e-2  # the head's adapter acts
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(IDS).logits
    torch.testing.assert_close(merged_logits, mean, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.model.embed_tokens.weight, original)  # bit for bit
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is False
    # PEFT's "can lead to complications" warnings are about the in-place merge, fixed here
    assert built_warnings == [] and tied_warnings(seen) == []


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_merge_adapter_then_unmerge_gives_the_tie_back_exactly(name: str) -> None:
    model, _ = adapted(name)
    shared = embedding(model)
    original = shared.detach().clone()
    mean = mean_logits(name, model)
    head = model.base_model.model.lm_head
    model.merge_adapter()
    assert head.merged and head.get_base_layer().weight is not shared
    assert torch.equal(shared, original)  # the embedding is untouched while merged
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, mean, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert not head.merged
    assert head.get_base_layer().weight is shared  # the very tensor: tied again
    assert torch.equal(shared, original)
    torch.testing.assert_close(mean_logits(name, model), mean, rtol=1e-5, atol=1e-5)


def test_a_merge_that_merges_nothing_leaves_the_tie() -> None:
    model, _ = adapted("blob")
    shared = embedding(model)
    head = model.base_model.model.lm_head
    head.merge(adapter_names=[])  # PEFT merges no adapter and returns
    assert not head.merged and head.get_base_layer().weight is shared


def test_only_a_shared_base_weight_is_copied_on_merge() -> None:
    model, _ = adapted("blob")
    assert mark_shared_base_weights(model) == ["base_model.model.lm_head"]
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    q_weight = q_proj.get_base_layer().weight
    model.merge_adapter()
    assert q_proj.get_base_layer().weight is q_weight  # merged in place, as PEFT does
    untied, _ = adapted("blob", base=tiny_llama(0))
    assert mark_shared_base_weights(untied) == []


def test_a_saved_merged_model_reloads_with_its_own_head(tmp_path) -> None:
    """A merged tied model saved and loaded by transformers: the config says untied, so the
    loader keeps the merged head instead of tying it back to the embedding."""
    model, _ = adapted("blob")
    mean = mean_logits("blob", model)
    model.merge_and_unload().save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter"])
def test_an_adapter_added_after_the_build_on_the_tied_head_merges_into_a_copy(merge: str) -> None:
    """The build marks the tied head only when it wraps it; an adapter added later with
    ``add_adapter`` can wrap it first, so the shared weights are looked up at merge time."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_blob_model(tied_base(), lora, BlobConfig())
    head_only = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], task_type="CAUSAL_LM")
    head_only._custom_modules = lora._custom_modules  # the tuner's layers, as the build's
    model.add_adapter("head", head_only)
    model.set_adapter("head")
    draw_adapter_weights(model)
    original = embedding(model).detach().clone()
    mean = mean_logits("blob", model)
    assert (mean - tied_base()(IDS).logits).abs().max() > 1e-2  # the head's adapter acts
    merged = getattr(model, merge)() or model
    assert torch.equal(embedding(merged), original)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, mean, rtol=1e-5, atol=1e-5)
