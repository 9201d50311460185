"""Loading saved adapters with the checks every method needs."""

from __future__ import annotations

import warnings
from pathlib import Path

from peft import PeftModel
from torch import nn

from blob_lora.tuners.blob import adapter_state_shapes, read_adapter_weights
from blob_lora.utils.errors import CheckpointError


def load_plain_adapter(
    base: nn.Module, adapter_dir: Path, adapter_name: str = "default"
) -> PeftModel:
    """``PeftModel.from_pretrained`` with shape/key checks and safetensors only."""
    adapter_dir = Path(adapter_dir)
    state = read_adapter_weights(adapter_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=adapter_name)
        except (RuntimeError, ValueError, OSError) as exc:
            # torch lists one "size mismatch for <name>: ..." line per tensor: keep one line
            lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
            sizes = [x for x in lines if x.startswith("size mismatch")]
            detail = "; ".join(sizes[:3]) if sizes else " ".join(lines)
            if sizes:
                detail = f"made for another base model? {len(sizes)} tensors differ: {detail}"
            raise CheckpointError(
                f"adapter in {adapter_dir} does not fit this model ({detail})"
            ) from exc
    expected = adapter_state_shapes(model, adapter_name)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"adapter in {adapter_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}"
        )
    model.eval()
    return model
