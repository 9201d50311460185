"""BLoB as a PEFT tuner: ``config`` (settings), ``layer`` (Bayesian LoRA layers), ``noise``
(the sampled ``A x``), ``kl`` (closed-form KL), ``model`` (build, sample, save, load) and
``std_report`` (where the std of ``A`` ended)."""

from blob_lora.tuners.blob.config import BlobConfig, last_blocks_pattern
from blob_lora.tuners.blob.kl import gaussian_kl, kl_divergence
from blob_lora.tuners.blob.layer import BlobLayerMixin, BlobLinear
from blob_lora.tuners.blob.model import (
    blob_layers,
    eval_noise,
    get_blob_model,
    load_blob_model,
    predictive_noise_mode,
    predictive_samples,
    sampling,
    std_parameters,
)
from blob_lora.tuners.peft_adapter import adapter_state_shapes, read_adapter_weights

__all__ = [
    "BlobConfig",
    "BlobLayerMixin",
    "BlobLinear",
    "adapter_state_shapes",
    "blob_layers",
    "eval_noise",
    "gaussian_kl",
    "get_blob_model",
    "kl_divergence",
    "last_blocks_pattern",
    "load_blob_model",
    "predictive_noise_mode",
    "predictive_samples",
    "read_adapter_weights",
    "sampling",
    "std_parameters",
]
