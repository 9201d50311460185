"""blob-lora: Bayesian LoRA (BLoB) fine-tuning on transformers + PEFT, with calibrated predictions."""

from blob_lora.tuners.blob import (
    BlobConfig,
    blob_layers,
    get_blob_model,
    kl_divergence,
    last_blocks_pattern,
    load_blob_model,
    sampling,
    std_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "BlobConfig",
    "__version__",
    "blob_layers",
    "get_blob_model",
    "kl_divergence",
    "last_blocks_pattern",
    "load_blob_model",
    "sampling",
    "std_parameters",
]
