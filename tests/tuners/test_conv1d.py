"""Every custom tuner (BLoB, Bayesian-LoRA, ABMLL) on transformers' ``Conv1D`` (GPT-2's
projections), and the refusal of a targeted module a tuner has no layer for.

Why: PEFT falls back to its own LoRA layer for a base module type a custom tuner does not map;
before, a GPT-2 BLoB run adapted ``c_attn`` as plain deterministic LoRA and put its only
Bayesian layer on ``lm_head``, without a word.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

from blob_lora import BlobConfig, get_blob_model, load_blob_model
from blob_lora.tuners.abmll import AbmllConfig, get_abmll_model
from blob_lora.tuners.abmll.layer import AbmllLayerMixin
from blob_lora.tuners.abmll.model import sampling as abmll_sampling
from blob_lora.tuners.bayesian_lora import BayesianLoraConfig, get_bayesian_lora_model
from blob_lora.tuners.bayesian_lora.layer import BayesianLoraLayerMixin
from blob_lora.tuners.bayesian_lora.model import sampling as bl_sampling
from blob_lora.tuners.blob.layer import BlobLayerMixin
from blob_lora.tuners.blob.model import sampling as blob_sampling
from blob_lora.utils.errors import ConfigError
from tests.factories import draw_adapter_weights, tiny_gpt2, tiny_llama

#: both Conv1D kinds of a GPT-2 block: c_attn 32 -> 96, c_fc 32 -> 128 (neither square, so a
#: delta merged untransposed could not even be added)
GPT2_TARGETS = ["c_attn", "c_fc"]
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))

TUNERS = {
    "blob": (get_blob_model, BlobConfig(), BlobLayerMixin, blob_sampling),
    "bayesian-lora": (
        get_bayesian_lora_model,
        BayesianLoraConfig(layers=".*"),  # the default names Llama's layers, not GPT-2's
        BayesianLoraLayerMixin,
        bl_sampling,
    ),
    "abmll": (get_abmll_model, AbmllConfig(), AbmllLayerMixin, abmll_sampling),
}


def gpt2_lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, task_type="CAUSAL_LM")


def trained(name: str):
    """The tuner on a tiny GPT-2, every adapter weight drawn away from its start (B non-zero,
    as after training), the mean adapter refreshed where the tuner keeps a copy of it."""
    build, options, _, _ = TUNERS[name]
    return draw_adapter_weights(build(tiny_gpt2(0), gpt2_lora(), options))


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_every_conv1d_projection_gets_the_tuners_layer(name: str) -> None:
    model = trained(name)
    _, _, mixin, _ = TUNERS[name]
    adapted = {
        n: m for n, m in model.named_modules() if n.endswith(tuple(f".{t}" for t in GPT2_TARGETS))
    }
    assert len(adapted) == 4  # 2 blocks x (c_attn, c_fc)
    for n, layer in adapted.items():
        assert isinstance(layer, mixin), n
        assert isinstance(layer.get_base_layer(), Conv1D)
        assert layer.fan_in_fan_out and layer.is_target_conv_1d_layer


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_the_mean_adapter_is_peft_lora_on_conv1d_and_merges_transposed(name: str) -> None:
    """Sampling off, each tuner's output is plain PEFT LoRA's with the same ``A`` and ``B``
    (PEFT's own Conv1D handling, the reference), and merging the mean into the transposed
    ``Conv1D`` weight gives the same output again; sampling moves it."""
    model = trained(name)
    _, _, _, sampling = TUNERS[name]
    plain = get_peft_model(tiny_gpt2(0), gpt2_lora())
    weights = {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    plain_weights = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    assert weights.keys() == plain_weights.keys()
    plain.load_state_dict(weights, strict=False)
    with torch.no_grad():
        with sampling(model, False):
            mean = model(IDS).logits
        with sampling(model, True):
            drawn = model(IDS).logits
        reference = plain(IDS).logits
        merged = model.merge_and_unload()(IDS).logits
    torch.testing.assert_close(mean, reference, rtol=0, atol=1e-6)
    assert (mean - tiny_gpt2(0)(IDS).logits).abs().max() > 1e-3  # the adapter acts
    torch.testing.assert_close(merged, mean, rtol=1e-5, atol=1e-5)
    assert (drawn - mean).abs().max() > 1e-4


def test_a_gpt2_blob_adapter_saves_and_loads_exactly(tmp_path) -> None:
    model = trained("blob")
    model.save_pretrained(tmp_path)
    loaded = load_blob_model(tiny_gpt2(0), tmp_path)
    plain = PeftModel.from_pretrained(tiny_gpt2(0), tmp_path)  # plain PEFT: the mean model
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad(), blob_sampling(model, False), blob_sampling(loaded, False):
        mean = model(IDS).logits
        assert torch.equal(loaded(IDS).logits, mean)
        torch.testing.assert_close(plain(IDS).logits, mean, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_a_target_without_the_tuners_layer_is_refused_by_name(name: str) -> None:
    """An ``nn.Embedding`` target would otherwise train as PEFT's deterministic LoRA."""
    build, options, _, _ = TUNERS[name]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ConfigError, match=r"model\.embed_tokens \(Embedding\).*leave those out"):
        build(tiny_llama(0), lora, options)
