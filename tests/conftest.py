"""Shared fixtures: a tiny model, the data folder, SmolLM2's tokenizer and a model folder on it.

The builders themselves live in ``tests.factories`` (import them from there).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.factories import save_model_folder, tiny_base, tiny_llama, tiny_tokenizer

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str) -> ModuleType:
    """Import a script that is not in a package (``bench/*.py``, ``paper/*.py``) by its path
    under the repository root, registered as ``name`` (dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared offline datasets (CI sets BLOB_LORA_DATA=../shared/data)."""
    env = os.environ.get("BLOB_LORA_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"dataset root {root} not found")
    return root.resolve()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from blob_lora.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A local model folder (tiny random Llama + SmolLM2's tokenizer) usable as ``--model``."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(seed=0, vocab_size=len(smollm2_tokenizer))
    model.config.pad_token_id = smollm2_tokenizer.pad_token_id
    return save_model_folder(folder, model, smollm2_tokenizer)


@pytest.fixture(scope="session")
def char_tok():
    """The character tokenizer of ``tests.factories`` (every answer one token)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def char_base(char_tok):
    """A random tiny Llama over ``char_tok``; copy it before wrapping it (``train_tiny`` does)."""
    return tiny_base(char_tok)


@pytest.fixture
def noise_spy(monkeypatch) -> list[str]:
    """The noise modes BLoB layers sample with (every call of ``sample_lora_hidden``)."""
    from blob_lora.tuners.blob import layer as layer_module

    seen: list[str] = []
    real = layer_module.sample_lora_hidden

    def spy(x, mean, std, mode):
        seen.append(mode)
        return real(x, mean, std, mode)

    monkeypatch.setattr(layer_module, "sample_lora_hidden", spy)
    return seen
