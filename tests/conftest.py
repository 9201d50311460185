"""Shared fixtures: tiny randomly initialised Llama-style models built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(seed: int = 0, vocab_size: int = 128, dtype: torch.dtype = torch.float32):
    """A 2-block Llama with hidden size 32: fast enough for every unit test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


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
    model.save_pretrained(folder, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(folder)
    return folder
