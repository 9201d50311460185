"""A cheap digest of a model's weights (or of any named tensors): what tells one model from
another without hashing every weight.

Why in ``utils``: a stopped evaluation's progress is keyed on it (``prediction.resume``), and
a run records its base model's (``training``) so that reloading it on other weights is noticed;
both floors sit above this one.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

#: values read from each tensor for the weight fingerprint (strided over the whole tensor)
_FINGERPRINT_VALUES = 4096


def model_fingerprint(model: nn.Module) -> str:
    """A digest of ``model``'s state: every tensor's name, shape and dtype, and a strided
    sample of its values (all of them for tensors up to ``_FINGERPRINT_VALUES`` elements).

    Sampled, not hashed whole: it must tell a retrained adapter (every value differs) or
    another base model from this one, and it runs before every evaluation. Measured on
    SmolLM2-135M (idle 2-core machine): 0.02-0.07 s, against 0.64 s for a SHA-256 of every
    weight, which grows with the model (and would copy a GPU model to the host whole).
    """
    return tensors_fingerprint(model.state_dict())


def tensors_fingerprint(tensors: dict[str, Any]) -> str:
    """The digest of :func:`model_fingerprint` over named ``tensors`` (a state dict, or a
    posterior's own tensors: ``Method.posterior_tensors``)."""
    h = hashlib.sha256()
    for name, tensor in tensors.items():
        if not torch.is_tensor(tensor):
            continue
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0 or flat.is_meta:  # an offloaded weight has no values here
            continue
        stride = max(1, flat.numel() // _FINGERPRINT_VALUES)
        values = flat[::stride].to("cpu", copy=True)
        if values.dtype == torch.bool:
            values = values.to(torch.uint8)
        h.update(values.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
