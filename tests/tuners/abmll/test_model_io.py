"""Saving and loading ABMLL's global parameters, plain-PEFT loading, the settings, refusals of
bad folders, and the method's prediction hooks."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from blob_lora.methods.abmll import AbmllMethod, answer_nll
from blob_lora.tuners.abmll import (
    AbmllConfig,
    abmll_layers,
    adapt,
    global_posterior,
    load_abmll_model,
    task_posterior,
)
from blob_lora.utils.errors import CheckpointError, ConfigError
from tests.factories import tiny_abmll_model, tiny_llama
from tests.tuners.abmll.common import IDS, logits

torch.set_num_threads(1)


def test_save_load_round_trips_bit_for_bit(tmp_path):
    model = tiny_abmll_model(0, beta=3e-6, inner_steps=2)
    # an installed task posterior is never saved: the folder holds the global parameters
    with task_posterior(model, global_posterior(model, detach=True)):
        model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "abmll_config.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = load_abmll_model(tiny_llama(0), tmp_path)
    assert loaded.abmll_configs["default"] == model.abmll_configs["default"]
    saved, restored = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert saved.keys() == restored.keys()
    assert sum("lora_sigma" in k for k in saved) == 5 * 2  # 5 layers x (A_sigma, B_sigma)
    for k in saved:
        assert torch.equal(saved[k], restored[k]), k
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode
    for mode in (None, "shared", "independent"):
        assert torch.equal(logits(model, mode, seed=3), logits(loaded, mode, seed=3))
    assert (logits(model, "shared", seed=3) - logits(model, None)).abs().max() > 1e-4
    # the loaded globals adapt to a task exactly as the saved ones did
    gen = torch.Generator().manual_seed(8)
    support = [{"input_ids": IDS, "labels": torch.randint(0, 4, (3,), generator=gen)}]

    def nll(m, b):
        return torch.nn.functional.cross_entropy(
            m(input_ids=b["input_ids"]).logits[:, -1, :4], b["labels"]
        )

    a, b = adapt(model, support, nll, seed=1), adapt(loaded, support, nll, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plain_peft_loads_the_global_mean(tmp_path):
    model = tiny_abmll_model(1)
    model.save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(tiny_llama(1), str(tmp_path))
    with torch.no_grad():
        expected = plain(input_ids=IDS).logits
    assert torch.equal(logits(model, None), expected)


def _saved(tmp_path):
    tiny_abmll_model(0).save_pretrained(tmp_path)
    return tmp_path


def test_load_refuses_a_missing_or_corrupt_settings_file(tmp_path):
    folder = _saved(tmp_path)
    (folder / "abmll_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_abmll_model(tiny_llama(0), folder)
    (folder / "abmll_config.json").write_text(json.dumps({"inner_lr": 0}))
    with pytest.raises(CheckpointError, match="invalid settings.*inner_lr"):
        load_abmll_model(tiny_llama(0), folder)
    (folder / "abmll_config.json").unlink()
    with pytest.raises(CheckpointError, match="not an ABMLL adapter folder"):
        load_abmll_model(tiny_llama(0), folder)


def test_load_refuses_corrupt_weights(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if "lora_sigma_B" in k)
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_abmll_model(tiny_llama(0), folder)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_abmll_model(tiny_llama(0), folder)


def test_load_refuses_another_base_and_a_plain_lora(tmp_path):
    folder = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_abmll_model(tiny_llama(0, hidden_size=48, num_attention_heads=4), folder)
    weights = folder / "adapter_model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if "lora_sigma" not in k}
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="plain LoRA adapter"):
        load_abmll_model(tiny_llama(0), folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_abmll_model(tiny_llama(0), tmp_path / "nowhere")


def test_settings_refuse_bad_values_by_name():
    with pytest.raises(ConfigError, match="AbmllConfig.inner_lr must be a finite number > 0"):
        AbmllConfig(inner_lr=0)
    with pytest.raises(ConfigError, match="AbmllConfig.first_order must be true or false"):
        AbmllConfig(first_order="yes")
    with pytest.raises(ConfigError, match="AbmllConfig.inner_samples must be an integer >= 1"):
        AbmllConfig(inner_samples=0)
    with pytest.raises(ConfigError, match="AbmllConfig.beta must be a finite number >= 0"):
        AbmllConfig(beta=float("nan"))
    with pytest.raises(ConfigError, match="unknown AbmllConfig fields"):
        AbmllConfig.from_dict({"prior_std": 1.0})


def test_task_posteriors_nest_and_restore():
    model = tiny_abmll_model(0)
    outer = global_posterior(model, detach=True)
    inner = {k: v + 0.1 for k, v in outer.items()}
    with task_posterior(model, outer):
        before = logits(model, None)
        with task_posterior(model, inner):
            assert (logits(model, None) - before).abs().max() > 1e-4
        assert torch.equal(logits(model, None), before)
    assert all(not layer.abmll_task for _, layer in abmll_layers(model))


def test_task_posterior_must_fit_the_model():
    model = tiny_abmll_model(0)
    post = global_posterior(model, detach=True)
    post.pop(next(iter(post)))
    with pytest.raises(ConfigError, match="does not fit this model"), task_posterior(model, post):
        pass


def test_method_predicts_from_the_installed_task_posterior():
    method = AbmllMethod()
    model = tiny_abmll_model(0)
    assert method.owns(model) and not method.owns(tiny_llama(0))
    assert method.eval_samples(model, None) == 10 and method.eval_samples(model, 3) == 3
    assert len(method.stochastic_modules(model)) == 5  # 2 blocks x q/v + head
    option_ids = torch.tensor([10, 11, 12, 13])
    batch = {
        "input_ids": IDS,
        "attention_mask": torch.ones_like(IDS),
        "option_mask": torch.ones(3, 4, dtype=torch.bool),
        "labels": torch.tensor([0, 1, 2]),
    }
    nll = answer_nll(option_ids)
    post = adapt(model, [batch], nll, seed=0)
    global_mean = method.predict_samples(model, batch, option_ids, 0)
    with task_posterior(model, post):
        mean = method.predict_samples(model, batch, option_ids, 0)
        torch.manual_seed(0)
        samples = method.predict_samples(model, batch, option_ids, 4, fold=2)
    assert mean.shape == (1, 3, 4) and samples.shape == (4, 3, 4)
    torch.testing.assert_close(samples.sum(-1), torch.ones(4, 3))
    assert (mean - global_mean).abs().max() > 1e-6  # the task posterior is what predicts
    assert (samples[0] - samples[1]).abs().max() > 1e-6  # independent draws
