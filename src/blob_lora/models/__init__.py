"""Loading base models and tokenizers: the embedded SmolLM2, local folders, Hub names."""

from blob_lora.models.loading import EMBEDDED_MODELS, load_model_and_tokenizer, load_tokenizer

__all__ = ["EMBEDDED_MODELS", "load_model_and_tokenizer", "load_tokenizer"]
