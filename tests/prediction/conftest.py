"""Tiny BLoB models, a tokenizer without downloads, and question records for prediction tests."""

from __future__ import annotations

import json

import pytest

from blob_lora import last_blocks_pattern
from blob_lora.training.config import TrainConfig
from tests.factories import llama_style_tokenizer, tiny_blob_model, tiny_llama


def blob_model(bayesian_blocks: int | None = 1, head: bool = True, seed: int = 0, std=(0.2, 0.4)):
    """Tiny 2-block Llama with BLoB on q/v/lm_head; ``bayesian_blocks`` = k last blocks random
    (``None``: every LoRA layer). ``lora_B`` and the std are set large so samples differ."""
    layers = None if bayesian_blocks is None else last_blocks_pattern(2, bayesian_blocks, head)
    return tiny_blob_model(seed, std, bayesian_layers=layers).eval()


@pytest.fixture(scope="session")
def tokenizer():
    tok = llama_style_tokenizer()
    tok.pad_token = tok.eos_token  # as blob_lora.models.load_tokenizer does
    tok.padding_side = "left"
    return tok


RECORDS = [
    {"id": "q1", "question": "Which is a fruit?", "choices": ["apple", "stone"], "answer": 0},
    {"question": "Pick the colour.", "choices": ["red", "dog", "cat"], "answer": "A"},
    {
        "id": "q3",
        "question": "What is seen?",
        "choices": ["sun", "moon", "star", "rock"],
        "context": "At night the sky is dark.",
    },
    {"id": 7, "question": "Which one?", "choices": ["x", "y"]},
]


@pytest.fixture
def records():
    return [dict(r) for r in RECORDS]


@pytest.fixture
def run_dir(tmp_path, tokenizer):
    """A run folder as ``blob-lora train`` leaves it: config, adapter, base model folder."""
    base_dir = tmp_path / "base"
    base = tiny_llama(0)
    base.config.pad_token_id = tokenizer.eos_token_id
    base.save_pretrained(base_dir, safe_serialization=True)
    tokenizer.save_pretrained(base_dir)
    run = tmp_path / "run"
    cfg = TrainConfig(
        model=str(base_dir),
        task="arc_easy",
        method="blob",
        out=str(run),
        max_length=128,
        eval_batch_size=3,
        eval_samples=4,
        lora_r=4,
        lora_alpha=8,
        bayesian_layers=[r"\blayers\.1\.", r"\blm_head$"],
    )
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    blob_model(bayesian_blocks=1).save_pretrained(run / "adapter")
    return run
