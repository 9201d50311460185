"""Methods as strategies: the hooks of ``Method``, the registry, and the add-a-method recipe of
CONTRIBUTING.md (one module plus its registry entry, nothing else) proven end to end."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch

from blob_lora.methods import METHODS, Method, get_method, method_of
from blob_lora.methods.blob import blob_config_from
from blob_lora.methods.composite import CompositeMethod
from blob_lora.methods.lora import LoraMethod
from blob_lora.prediction import Predictor
from blob_lora.training.config import TrainConfig
from blob_lora.training.saved_run import load_run
from blob_lora.tuners.blob import BlobConfig
from blob_lora.utils.errors import ConfigError
from tests.factories import TINY_TASK, tiny_model_folder, tiny_run_config, train_tiny

torch.set_num_threads(1)


def test_every_registered_method_implements_the_strategy() -> None:
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name
        assert not inspect.isabstract(type(method)), name
    with pytest.raises(TypeError, match="abstract"):
        Method()  # the base declares build and load; it is no method by itself
    assert get_method("lora").__class__ is LoraMethod
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        get_method("nope")


def test_the_method_declares_what_prediction_may_do() -> None:
    """What prediction used to guess from the name is declared by the methods themselves."""
    assert get_method("mc-dropout").iid_samples and get_method("blob").iid_samples
    assert not get_method("ensemble").iid_samples and not get_method("lora").iid_samples
    assert get_method("lora").stochastic_modules(torch.nn.Linear(2, 2)) is None


def test_composite_methods_are_trained_as_sub_runs_only(tmp_path) -> None:
    for name in ("ensemble", "tfb", *(["laplace"] if "laplace" in METHODS else [])):
        method = get_method(name)
        assert isinstance(method, CompositeMethod)
        with pytest.raises(ConfigError, match="sub-runs"):
            method.build(torch.nn.Linear(2, 2), TrainConfig(out=str(tmp_path)))


def test_blob_settings_come_from_one_place(tmp_path) -> None:
    cfg = TrainConfig(out=str(tmp_path), std_param="softplus", bayesian_layers=["lm_head"])
    assert blob_config_from(cfg).eval_samples == BlobConfig().eval_samples == 10
    assert get_method("blob").samples_by_default == BlobConfig().eval_samples
    assert blob_config_from(cfg).std_param == "softplus"
    tfb = blob_config_from(cfg, std_param="square", bayesian_layers=None)
    assert (tfb.std_param, tfb.bayesian_layers, tfb.prior_std) == (
        "square",
        None,
        cfg.blob.prior_std,
    )
    assert blob_config_from(TrainConfig(out=str(tmp_path), eval_samples=3)).eval_samples == 3


def test_method_of_recognises_a_loaded_model(char_base) -> None:
    from peft import LoraConfig, get_peft_model

    from blob_lora import get_blob_model

    lora = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    assert method_of(get_blob_model(copy.deepcopy(char_base), lora)).name == "blob"
    assert method_of(get_peft_model(copy.deepcopy(char_base), lora)).name == "lora"


class ToyMethod(LoraMethod):
    """A method as CONTRIBUTING.md adds one: a subclass and a registry entry, nothing else."""

    name = "toy"
    samples_by_default = 2
    iid_samples = True
    calls = 0

    def weight_decay(self, cfg) -> float:
        return 0.5

    def predict_samples(self, model, batch, option_ids, n_samples, fold=None):
        self.calls += 1
        return super().predict_samples(model, batch, option_ids, n_samples, fold)


def test_a_new_method_needs_one_module_and_its_registry_entry(
    tmp_path, data_root, char_base, char_tok, monkeypatch
) -> None:
    """Registered (the one line of ``methods/registry.py``), a new method is accepted by the
    config, trained, evaluated, saved, re-opened and predicted by the unchanged harness."""
    toy = ToyMethod()
    monkeypatch.setitem(METHODS, "toy", toy)
    model_dir = tiny_model_folder(tmp_path / "model")
    cfg = tiny_run_config(tmp_path / "toy", data_root, "toy", model=str(model_dir))
    summary = train_tiny(cfg, char_base, char_tok)
    assert summary["method"] == "toy"
    metrics = summary["evaluations"][TINY_TASK]
    assert metrics["method"] == "toy" and metrics["eval_samples"] == 4 and toy.calls > 0
    loaded = load_run(Path(cfg.out))
    assert loaded.method is toy
    rows = Predictor.from_run(cfg.out, mode="early").predict(
        [{"question": "Which?", "choices": ["a", "b"]}]
    )
    assert len(rows) == 1 and rows[0]["n_samples"] >= 2
