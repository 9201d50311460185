"""Whole tensors from FSDP2 shards, wherever a floor needs them.

Why in ``utils``: training gathers its checkpoints, KL and saved adapter this way, and the
tuners' own reports (``tuners.blob.std_report``) must read whole tensors too; both floors sit
above this one, so the gathering is written once, here.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def full_tensors(obj: T) -> T:
    """``obj`` (a tensor, or a state dict nesting them) with every DTensor replaced by its whole
    value. A collective under FSDP: every process must call it on the same structure."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor()  # type: ignore[return-value]
    if isinstance(obj, dict):
        return {k: full_tensors(v) for k, v in obj.items()}  # type: ignore[return-value]
    if isinstance(obj, list | tuple):
        return type(obj)(full_tensors(v) for v in obj)  # type: ignore[return-value]
    return obj
