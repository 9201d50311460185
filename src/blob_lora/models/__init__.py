"""Loading base models and tokenizers: the embedded SmolLM2, local folders, Hub names."""

from blob_lora.models.loading import (
    EMBEDDED_MODELS,
    check_model_pair,
    load_model_and_tokenizer,
    load_tokenizer,
)

__all__ = ["EMBEDDED_MODELS", "check_model_pair", "load_model_and_tokenizer", "load_tokenizer"]
