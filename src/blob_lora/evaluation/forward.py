"""One forward pass from a collated batch to answer-option logits."""

from __future__ import annotations

import torch
from torch import nn

from blob_lora.tasks import option_logits


def position_ids_for_left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each sequence's first real token (left padding shifts them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], option_ids: torch.Tensor
) -> torch.Tensor:
    """(B, C) logits of the answer tokens at the last position; absent options are -inf.

    Only the last position's vocabulary logits are computed (``logits_to_keep=1``): the full
    (B, T, V) tensor would dominate time and memory for a 50k-token vocabulary.
    """
    mask = batch["attention_mask"]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=position_ids_for_left_padding(mask),
        logits_to_keep=1,
        use_cache=False,
    )
    last = out.logits[:, -1, :].float()
    return option_logits(last, option_ids.to(last.device), batch["option_mask"])


def repeat_batch(batch: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Fold ``times`` copies of a batch into the batch dimension (sample-major order)."""
    if times == 1:
        return batch
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in batch.items()}
