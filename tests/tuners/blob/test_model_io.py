"""Building, mean mode, saving, loading, merging and error handling of BLoB models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from blob_lora import BlobConfig, get_blob_model, last_blocks_pattern, load_blob_model, sampling
from blob_lora.tuners.blob.layer import BlobLinear
from blob_lora.utils.errors import CheckpointError, ConfigError
from tests.factories import TARGETS, tiny_blob_model, tiny_llama


def lora_config(**kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", **kw)


def trained_blob(seed: int = 0, **blob_kw):
    """A BLoB model with non-trivial B (as after training) so that noise reaches the output."""
    return tiny_blob_model(seed, **blob_kw)


IDS = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(5))


def test_sampling_is_on_by_default_and_off_gives_mean() -> None:
    model = trained_blob()
    with torch.no_grad():
        a, b = model(IDS).logits, model(IDS).logits
        assert not torch.allclose(a, b)
        with sampling(model, False):
            m1, m2 = model(IDS).logits, model(IDS).logits
    assert torch.equal(m1, m2)
    assert all(layer.blob_sampling for layer in model.modules() if isinstance(layer, BlobLinear))


def test_mean_mode_bit_identical_to_plain_lora() -> None:
    blob = trained_blob()
    plain = get_peft_model(tiny_llama(0), lora_config())
    blob_state = {k: v for k, v in blob.state_dict().items() if "lora_A_rho" not in k}
    missing, unexpected = plain.load_state_dict(blob_state, strict=True), None
    del missing, unexpected
    with torch.no_grad(), sampling(blob, False):
        assert torch.equal(blob(IDS).logits, plain(IDS).logits)


def test_save_load_round_trip_exact(tmp_path) -> None:
    model = trained_blob(flipout="sequence", std_param="softplus", eval_samples=7)
    model.save_pretrained(tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json", "blob_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert not list(tmp_path.glob(".*tmp*"))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("lora_A_rho") for k in saved)
    assert not any("base_layer" in k for k in saved), "frozen base weights must not be saved"
    assert json.loads((tmp_path / "blob_config.json").read_text())["eval_samples"] == 7

    loaded = load_blob_model(tiny_llama(0), tmp_path)
    src = {k: v for k, v in model.state_dict().items() if "lora" in k}
    dst = loaded.state_dict()
    assert src.keys() <= dst.keys()
    for key, value in src.items():
        assert torch.equal(value, dst[key]), key
    assert loaded.blob_configs["default"] == BlobConfig(
        flipout="sequence", std_param="softplus", eval_samples=7
    )
    with torch.no_grad():
        torch.manual_seed(9)
        a = model(IDS).logits
        torch.manual_seed(9)
        b = loaded(IDS).logits
    assert torch.equal(a, b), "same seed must give the same sample after a round trip"


def test_plain_peft_loads_the_mean_adapter(tmp_path) -> None:
    model = trained_blob()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert not any(isinstance(m, BlobLinear) for m in plain.modules())
    with torch.no_grad(), sampling(model, False):
        assert torch.allclose(plain(IDS).logits, model(IDS).logits, atol=0, rtol=0)


def test_merge_and_unload_gives_the_mean_model() -> None:
    model = trained_blob()
    with torch.no_grad(), sampling(model, False):
        expected = model(IDS).logits
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BlobLinear) for m in merged.modules())
    with torch.no_grad():
        got = merged(IDS).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_bf16_base_keeps_fp32_adapters_and_samples() -> None:
    model = get_blob_model(tiny_llama(0, dtype=torch.bfloat16), lora_config(), BlobConfig())
    adapter = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    out = model(IDS).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_bayesian_layer_selection_is_saved_and_restored(tmp_path) -> None:
    patterns = last_blocks_pattern(num_layers=2, k=1, include_head=True)
    model = trained_blob(bayesian_layers=patterns)
    bayes = {n for n, m in model.named_modules() if isinstance(m, BlobLinear) and m.lora_A_rho}
    assert bayes == {
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.v_proj",
        "base_model.model.lm_head",
    }
    model.save_pretrained(tmp_path)
    loaded = load_blob_model(tiny_llama(0), tmp_path)
    again = {n for n, m in loaded.named_modules() if isinstance(m, BlobLinear) and m.lora_A_rho}
    assert again == bayes


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prior_std": 0}, "prior_std"),
        ({"prior_std": float("nan")}, "prior_std"),
        ({"init_std": -1}, "init_std"),
        ({"init_std": 1.5}, "init_std"),
        ({"std_param": "exp"}, "std_param"),
        ({"flipout": "layer"}, "flipout"),
        ({"eval_samples": -1}, "eval_samples"),
        ({"eval_samples": 2.5}, "eval_samples"),
        ({"bayesian_layers": ["("]}, "bayesian_layers"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field) as info:
        BlobConfig(**kwargs)
    assert isinstance(info.value, ConfigError)


def test_loading_onto_another_base_is_refused(tmp_path) -> None:
    trained_blob().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_blob_model(tiny_llama(0, vocab_size=96), tmp_path)


def test_corrupt_or_missing_checkpoint_is_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_blob_model(tiny_llama(0), tmp_path / "nope")
    trained_blob().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_blob_model(tiny_llama(0), tmp_path)
    (tmp_path / "blob_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="blob_config.json"):
        load_blob_model(tiny_llama(0), tmp_path)


def test_blob_method_n0_is_the_mean_model() -> None:
    """BLoB-Mean (N = 0) through the harness equals the mean-weights forward exactly."""
    from blob_lora.methods import get_method
    from blob_lora.models.forward import answer_logits

    model = trained_blob()
    batch = {
        "input_ids": IDS,
        "attention_mask": torch.ones_like(IDS),
        "option_mask": torch.ones(3, 4, dtype=torch.bool),
    }
    option_ids = torch.tensor([5, 6, 7, 8])
    got = get_method("blob").predict_samples(model, batch, option_ids, 0)
    with torch.no_grad(), sampling(model, False):
        expected = torch.softmax(answer_logits(model, batch, option_ids), -1)
    assert got.shape == (1, 3, 4)
    assert torch.equal(got[0], expected)
    assert all(layer.blob_sampling for layer in model.modules() if isinstance(layer, BlobLinear))
