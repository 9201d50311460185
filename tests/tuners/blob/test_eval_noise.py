"""BLoB's evaluation noise (issue 21.5): ``sequence`` (default, one coherent weight sample per
sequence) or the authors' ``token`` (token-wise Flipout), independent across folded samples."""

from __future__ import annotations

import json

import pytest
import torch

from blob_lora import BlobConfig, load_blob_model, sampling
from blob_lora.methods import get_method
from blob_lora.tuners.blob import eval_noise, predictive_noise_mode
from blob_lora.utils.errors import ConfigError
from tests.factories import one_layer_model, tiny_blob_model, tiny_llama


def _squared_noise_correlation(mode: str | None, calls: int = 3000) -> torch.Tensor:
    """Correlation, over calls, of the squared noise of two copies of one token in a batch."""
    model, layer = one_layer_model("token")
    torch.manual_seed(1)
    xs = torch.randn(6).expand(2, 1, 6).contiguous()
    with torch.no_grad():
        with sampling(model, False):
            mean = model(xs).view(2, -1)[0]
        with sampling(model, True, mode=mode):
            outs = torch.stack([model(xs).view(2, -1) for _ in range(calls)])
    sq = (outs - mean) ** 2
    a, b = sq[:, 0], sq[:, 1]
    return ((a - a.mean(0)) * (b - b.mean(0))).mean(0) / (a.std(0) * b.std(0))


def test_token_eval_noise_is_independent_across_folded_samples() -> None:
    """Training's token Flipout shares one noise magnitude per forward, so two folded copies of
    an example would be dependent samples (their squared noise correlates, ~0.2-0.4 here); the
    prediction mode draws a magnitude per sequence, as the authors' separate passes do."""
    shared = _squared_noise_correlation(None)
    independent = _squared_noise_correlation("independent-token")
    assert shared.mean() > 0.1, shared  # the check has the power to see dependence
    # 3000 calls: standard error of a correlation ~ 0.018
    assert independent.abs().max() < 0.07, independent


def test_token_eval_noise_varies_between_tokens_sequence_does_not() -> None:
    x = torch.randn(6).expand(3, 4, 6).contiguous()  # 3 sequences of 4 identical tokens
    model, _ = one_layer_model("token")
    for mode, tokens_equal in (("independent-token", False), ("independent", True)):
        with torch.no_grad(), sampling(model, True, mode=mode):
            out = model(x)
        assert not torch.allclose(out[0], out[1]), mode
        assert torch.allclose(out[:, :1].expand_as(out), out) == tokens_equal, mode


def _blob(eval_noise_kind: str | None = None):
    return tiny_blob_model(**({} if eval_noise_kind is None else {"eval_noise": eval_noise_kind}))


def test_eval_noise_setting_default_override_and_refusals() -> None:
    model = _blob()
    assert predictive_noise_mode(model) == "independent"  # default: coherent per sequence
    with eval_noise(model, "token"):
        assert predictive_noise_mode(model) == "independent-token"
        with eval_noise(model, None):  # None keeps what is set
            assert predictive_noise_mode(model) == "independent-token"
    assert predictive_noise_mode(model) == "independent"
    assert predictive_noise_mode(_blob("token")) == "independent-token"
    with pytest.raises(ConfigError, match="eval_noise"):
        BlobConfig(eval_noise="layer")
    with pytest.raises(ConfigError, match="eval noise"), eval_noise(model, "tokens"):
        pass
    plain = tiny_llama(0)
    with eval_noise(plain, "token"):  # no BLoB layers: nothing to set
        assert predictive_noise_mode(plain) == "independent"


def test_predictive_samples_use_the_eval_noise(noise_spy) -> None:
    """BLoB's predict_samples draws with the mode of the eval noise; training keeps flipout."""
    seen = noise_spy
    model = _blob()
    method = get_method("blob")
    batch_ids = torch.randint(0, 128, (2, 5))
    batch = {
        "input_ids": batch_ids,
        "attention_mask": torch.ones_like(batch_ids),
        "option_mask": torch.ones(2, 3, dtype=torch.bool),
    }
    option_ids = torch.tensor([3, 4, 5])
    torch.manual_seed(0)
    default = method.predict_samples(model, batch, option_ids, 3)
    assert set(seen) == {"independent"}
    seen.clear()
    with eval_noise(model, "token"):
        token = method.predict_samples(model, batch, option_ids, 3)
    assert set(seen) == {"independent-token"}
    assert default.shape == token.shape == (3, 2, 3)
    seen.clear()
    model.train()
    model(batch_ids)  # training noise is the configured flipout, whatever the eval noise
    assert set(seen) == {"token"}
    # the default is the coherent-sample path it always was: same seed, same probabilities
    torch.manual_seed(0)
    with sampling(model, True, mode="independent"):
        assert torch.equal(default, method.predict_samples(model, batch, option_ids, 3))


def test_eval_noise_is_saved_with_the_adapter_and_old_adapters_load_as_sequence(
    tmp_path,
) -> None:
    _blob("token").save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "blob_config.json").read_text())
    assert saved["eval_noise"] == "token"
    assert predictive_noise_mode(load_blob_model(tiny_llama(0), tmp_path / "new")) == (
        "independent-token"
    )
    del saved["eval_noise"]  # an adapter written before the setting existed
    (tmp_path / "new" / "blob_config.json").write_text(json.dumps(saved))
    old = load_blob_model(tiny_llama(0), tmp_path / "new")
    assert predictive_noise_mode(old) == "independent"
