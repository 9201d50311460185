"""What the ABMLL tests share: fixed prompt ids and the logits of a tiny model under a
seeded sampling block."""

from __future__ import annotations

import torch

from blob_lora.tuners.abmll import sampling

IDS = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(5))


def logits(model, mode: str | None, seed: int = 0) -> torch.Tensor:
    """The model's logits on :data:`IDS`: the means (``mode`` None) or one weight draw in
    ``mode`` from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), sampling(model, mode is not None, mode=mode, generator=gen):
        return model(input_ids=IDS).logits
