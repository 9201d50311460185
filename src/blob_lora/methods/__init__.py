"""Fine-tuning methods sharing one harness: BLoB and the paper's baselines."""

from blob_lora.methods.registry import METHODS, get_method

__all__ = ["METHODS", "get_method"]
