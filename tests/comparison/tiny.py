"""A tiny local model folder (random 2-block Llama + character-level tokenizer) for CLI tests.

Why: ``--model`` takes a folder, and the real SmolLM2 tokenizer takes ~20 s to read from its
GGUF; a Unigram tokenizer over single characters plus the answer pieces is built in
milliseconds and still scores every task by one answer token (" A".." E", " True"/" False").
"""

from __future__ import annotations

import string
from pathlib import Path


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + "▁\n"))
    words = ["▁Answer", "▁Question", "▁True", "▁False"] + [f"▁{c}" for c in "ABCDE"]
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    tk = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def tiny_base(tokenizer, seed: int = 0):
    """A random 2-block Llama (hidden 32) over ``tokenizer``'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def tiny_model_folder(path: Path, seed: int = 0) -> Path:
    """Write a random tiny Llama (safetensors) and its tokenizer into ``path``."""
    tok = tiny_tokenizer()
    path.mkdir(parents=True, exist_ok=True)
    tiny_base(tok, seed).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
