"""blob-lora: Bayesian LoRA (BLoB) fine-tuning on transformers + PEFT, with calibrated predictions.

The adapter (``get_blob_model``, ``kl_divergence``, ``sampling``, ...) is imported eagerly; the
harness (``train``, ``evaluate``, ``Predictor``, ``load_run``, ``TrainConfig``, ``Scoring``,
``METHODS``, ``get_method``, ``predict``; see ``blob_lora.api``) on first use.
"""

from typing import Any

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

_API = (
    "METHODS",
    "LoadedRun",
    "Predictor",
    "Scoring",
    "TrainConfig",
    "evaluate",
    "get_method",
    "load_run",
    "predict",
    "train",
)


def __getattr__(name: str) -> Any:
    if name in _API:
        from blob_lora import api

        return getattr(api, name)
    raise AttributeError(f"module 'blob_lora' has no attribute {name!r}")


__all__ = [
    *_API,
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
