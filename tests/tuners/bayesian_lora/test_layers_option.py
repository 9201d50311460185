"""``BayesianLoraConfig.layers``: which LoRA targets are Bayesian, the others plain LoRA.

The authors' code makes only q_proj, k_proj and lm_head Bayesian; with their LoRA targets
(q, v, head) the value projection is a plain LoRA layer. That is the default here, and the
hybrid model must train, sample, save and load like the all-Bayesian one.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel

from blob_lora.tuners.bayesian_lora import (
    BayesianLoraConfig,
    bayesian_lora_layers,
    get_bayesian_lora_model,
    kl_divergence,
    load_bayesian_lora_model,
    sampling,
)
from blob_lora.tuners.bayesian_lora.config import AUTHORS_LAYERS, EVERY_LAYER
from blob_lora.utils.errors import ConfigError
from tests.factories import TARGETS, tiny_bayesian_lora_model, tiny_gpt2, tiny_llama

torch.set_num_threads(1)
IDS = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(5))


def hybrid(seed: int = 0, **settings) -> PeftModel:
    """The tiny Llama with LoRA on q/v/lm_head under the default ``layers`` (``settings``
    override it), every posterior parameter and the plain adapters moved away from their
    initial values."""
    model = tiny_bayesian_lora_model(seed, **{"layers": AUTHORS_LAYERS, **settings})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "v_proj.lora_" in name:
                p.normal_(std=0.3)
    return model


def v_proj(model, block: int = 0):
    return model.base_model.model.model.layers[block].self_attn.v_proj


def out(model, mode: str | None, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad(), sampling(model, mode is not None, mode=mode):
        return model(input_ids=IDS).logits


def test_the_default_is_the_authors_layers_and_leaves_v_proj_plain():
    assert BayesianLoraConfig().layers == AUTHORS_LAYERS
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_bayesian_lora_model(tiny_llama(0), lora, BayesianLoraConfig())
    names = [n for n, _ in bayesian_lora_layers(model)]
    assert len(names) == 3  # q_proj of 2 blocks and the head
    assert all(n.endswith(("q_proj", "lm_head")) for n in names), names
    for block in (0, 1):
        plain = v_proj(model, block)
        assert not plain.is_bayesian() and "default" not in plain.lora_inducing_A
        # PEFT's LoRA initialisation: B = 0, so the plain adapter starts as the base layer
        assert torch.count_nonzero(plain.lora_B["default"].weight) == 0
        assert torch.count_nonzero(plain.lora_A["default"].weight) > 0
        assert plain.lora_A["default"].weight.requires_grad
        assert plain.lora_B["default"].weight.requires_grad
    # the Bayesian layers' PEFT weights are frozen copies of the posterior means
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not q.lora_A["default"].weight.requires_grad


def test_a_plain_layer_is_peft_lora_and_the_kl_counts_only_the_bayesian_ones():
    model = hybrid(1)
    layer = v_proj(model)
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), sampling(model, True, mode="shared"):
        got = layer(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.get_base_layer()(x) + layer.scaling["default"] * (x @ a.T @ b.T)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    kl = sum(
        post.kl()
        for _, lyr in bayesian_lora_layers(model)
        for post in (lyr.lora_inducing_A["default"], lyr.lora_inducing_B["default"])
    )
    assert torch.equal(kl_divergence(model), kl)
    # the samples move the output, the plain layer's part does not depend on them
    assert (out(model, "shared", 3) - out(model, None)).abs().max() > 1e-4
    with torch.no_grad():
        torch.manual_seed(7)
        with sampling(model, True):
            first = layer(x)
        torch.manual_seed(8)
        with sampling(model, True):
            second = layer(x)
    assert torch.equal(first, second)


def test_the_plain_adapters_train_with_the_posteriors():
    model = hybrid(2)
    with sampling(model, True):
        loss = model(input_ids=IDS).logits.square().mean() + kl_divergence(model)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("v_proj.lora_B" in n for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert v_proj(model).lora_B["default"].weight.grad.abs().sum() > 0


def test_a_hybrid_model_round_trips_and_plain_peft_loads_its_mean(tmp_path):
    model = hybrid(3)
    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "bayesian_lora_config.json").read_text())
    assert saved_config["layers"] == AUTHORS_LAYERS
    loaded = load_bayesian_lora_model(tiny_llama(3), tmp_path)
    before, after = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [n for n, _ in bayesian_lora_layers(loaded)] == [
        n for n, _ in bayesian_lora_layers(model)
    ]
    for mode in ("shared", "independent"):
        assert torch.equal(out(model, mode, 4), out(loaded, mode, 4))
    plain = PeftModel.from_pretrained(tiny_llama(3), str(tmp_path))
    with torch.no_grad():
        expected = plain(input_ids=IDS).logits
    torch.testing.assert_close(out(model, None), expected, rtol=0, atol=1e-6)


def test_a_folder_saved_before_the_option_loads_with_every_target_bayesian(tmp_path):
    model = hybrid(4, layers=EVERY_LAYER)
    assert len(list(bayesian_lora_layers(model))) == 5
    model.save_pretrained(tmp_path)
    path = tmp_path / "bayesian_lora_config.json"
    old = json.loads(path.read_text())
    del old["layers"]
    path.write_text(json.dumps(old))
    loaded = load_bayesian_lora_model(tiny_llama(4), tmp_path)
    assert len(list(bayesian_lora_layers(loaded))) == 5
    assert torch.equal(out(model, "shared", 5), out(loaded, "shared", 5))


def test_layers_that_match_no_target_or_no_regex_are_refused():
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
    with pytest.raises(ConfigError, match="--bayes-lora-layers.*'\\.\\*'"):
        get_bayesian_lora_model(tiny_gpt2(0), lora, BayesianLoraConfig())
    with pytest.raises(ConfigError, match="layers"):
        BayesianLoraConfig(layers="(q_proj")
    with pytest.raises(ConfigError, match="layers"):
        BayesianLoraConfig(layers="")


def test_the_pattern_is_matched_whole_against_the_name_in_the_base_model():
    cfg = BayesianLoraConfig()
    assert cfg.is_bayesian("model.layers.3.self_attn.q_proj")
    assert cfg.is_bayesian("lm_head")
    assert not cfg.is_bayesian("model.layers.3.self_attn.v_proj")
    assert not cfg.is_bayesian("model.layers.3.self_attn.q_proj_extra")
    one_block = BayesianLoraConfig(layers=r"model\.layers\.1\..*")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_bayesian_lora_model(tiny_llama(0), lora, one_block)
    names = [n for n, _ in bayesian_lora_layers(model)]
    assert names == [
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.v_proj",
    ]


def test_a_plain_layer_is_initialised_as_the_lora_config_says():
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_bayesian_lora_model(tiny_llama(0), lora, BayesianLoraConfig())
    # init_lora_weights=False: PEFT draws B too (a model that starts away from its base)
    assert torch.count_nonzero(v_proj(model).lora_B["default"].weight) > 0
