"""A forked random stream, so that a seeded pass of ours leaves the caller's stream as it was."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def forked_rng(model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager:
    """torch's generators (the CPU's, and that of ``model``'s accelerator) restored on leaving
    the block: a prediction or evaluation that seeds itself must not reset a user's training
    loop or notebook stream. ``enabled`` ``False``: a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)
