"""Saving, loading, plain-PEFT loading, settings and the method hooks of Bayesian-LoRA models."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from blob_lora.methods import get_method, method_of
from blob_lora.tuners.bayesian_lora import (
    BayesianLoraConfig,
    get_bayesian_lora_model,
    kl_divergence,
    load_bayesian_lora_model,
    sampling,
)
from blob_lora.utils.errors import CheckpointError, ConfigError
from tests.factories import TARGETS, tiny_bayesian_lora_model, tiny_llama

torch.set_num_threads(1)
IDS = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(5))


def logits(model, mode: str | None, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad(), sampling(model, mode is not None, mode=mode):
        return model(input_ids=IDS).logits


def test_save_load_round_trips_bit_for_bit(tmp_path):
    model = tiny_bayesian_lora_model(0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "bayesian_lora_config.json").is_file()
    loaded = load_bayesian_lora_model(tiny_llama(0), tmp_path)
    saved = dict(model.named_parameters())
    restored = dict(loaded.named_parameters())
    assert saved.keys() == restored.keys()
    inducing = [k for k in saved if "lora_inducing" in k]
    assert len(inducing) == 5 * 2 * 7  # 5 layers x (A, B) x 7 posterior tensors
    for k in saved:
        assert torch.equal(saved[k], restored[k]), k
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode
    assert torch.equal(logits(model, None), logits(loaded, None))
    for mode in ("shared", "independent"):
        assert torch.equal(logits(model, mode, seed=3), logits(loaded, mode, seed=3))
    assert torch.equal(kl_divergence(model), kl_divergence(loaded))
    # the samples really differ from the mean (the test above compares random outputs)
    assert (logits(model, "shared", seed=3) - logits(model, None)).abs().max() > 1e-4


def test_plain_peft_loads_the_posterior_mean(tmp_path):
    model = tiny_bayesian_lora_model(1)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    plain = PeftModel.from_pretrained(tiny_llama(1), str(tmp_path))
    with torch.no_grad():
        expected = plain(input_ids=IDS).logits
    torch.testing.assert_close(logits(model, None), expected, rtol=0, atol=1e-6)
    a_key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(state[a_key], layer.lora_inducing_A["default"].mean_weight().detach())


def test_mean_copies_are_not_trained_and_the_posterior_is():
    model = tiny_bayesian_lora_model(0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_inducing" in n for n in trainable)
    with sampling(model, True):
        loss = model(input_ids=IDS).logits.square().mean() + kl_divergence(model)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_load_refuses_a_foreign_folder_and_another_base(tmp_path):
    model = tiny_bayesian_lora_model(0)
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_bayesian_lora_model(tiny_llama(0, hidden_size=48), tmp_path)
    (tmp_path / "bayesian_lora_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_bayesian_lora_model(tiny_llama(0), tmp_path)
    (tmp_path / "bayesian_lora_config.json").unlink()
    with pytest.raises(CheckpointError, match="not a Bayesian-LoRA adapter folder"):
        load_bayesian_lora_model(tiny_llama(0), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_bayesian_lora_model(tiny_llama(0), tmp_path / "nothing")


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"inducing_rows": 0}, "inducing_rows"),
        ({"inducing_cols": 2.5}, "inducing_cols"),
        ({"prior_std": -1.0}, "prior_std"),
        ({"max_lamda": float("nan")}, "max_lamda"),
        ({"init_lamda": 0.5}, "init_lamda"),
        ({"init_u_std": 0.5}, "init_u_std"),
        ({"kl_weight": -0.1}, "kl_weight"),
        ({"eval_samples": -1}, "eval_samples"),
        ({"sqrt_width_scaling": "yes"}, "sqrt_width_scaling"),
    ],
)
def test_bad_settings_are_refused_by_name(settings, field):
    with pytest.raises(ConfigError, match=field):
        BayesianLoraConfig(**settings)


def test_unknown_saved_setting_is_refused():
    with pytest.raises(ConfigError, match="unknown BayesianLoraConfig fields"):
        BayesianLoraConfig.from_dict({"inducing_rows": 9, "rank": 3})


def test_saved_settings_are_the_papers_defaults(tmp_path):
    tiny_bayesian_lora_model(0).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "bayesian_lora_config.json").read_text())
    assert saved["inducing_rows"] == saved["inducing_cols"] == 9
    assert (saved["prior_std"], saved["max_lamda"], saved["max_u_std"]) == (0.1, 0.03, 0.1)
    assert (saved["kl_weight"], saved["eval_samples"]) == (0.1, 4)


def test_the_method_recognises_its_models_and_weights_the_kl():
    model = tiny_bayesian_lora_model(0)
    method = get_method("bayesian-lora")
    assert method_of(model) is method and method.owns(model)
    assert not get_method("blob").owns(model)
    torch.testing.assert_close(method.kl(model), 0.1 * kl_divergence(model))
    assert method.eval_samples(model, None) == 4 and method.eval_samples(model, 7) == 7
    assert len(method.stochastic_modules(model)) == 5  # q, v of two blocks; the head


def test_bfloat16_base_keeps_float32_posteriors():
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    bf16 = get_bayesian_lora_model(tiny_llama(0, dtype=torch.bfloat16), lora)
    assert {p.dtype for n, p in bf16.named_parameters() if "lora_inducing" in n} == {torch.float32}
    for mode in (None, "shared", "independent"):
        out = logits(bf16, mode)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with sampling(bf16, True):
        loss = bf16(input_ids=IDS).logits.float().square().mean() + kl_divergence(bf16)
    loss.backward()
    assert all(p.grad is not None for p in bf16.parameters() if p.requires_grad)


def test_quantised_base_is_refused():
    base = tiny_llama(0)
    fake = type("Linear4bit", (torch.nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    base.model.layers[0].self_attn.q_proj.__class__ = fake
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    with pytest.raises(ConfigError, match=r"quantised bases \(Linear4bit\).*--load-in-4bit"):
        get_bayesian_lora_model(base, lora)
