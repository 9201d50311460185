"""The core forward: a collated batch to answer-option logits (letter or cloze scoring), and the
sample folding every predictive uses.

Why in ``models``: training, the methods, the prefix reuse of ``models.prefix`` and prediction all
run this one forward, so it sits on the floor every one of them may import.
"""

from __future__ import annotations

import torch
from torch import nn

from blob_lora.tasks import option_logits
from blob_lora.utils.errors import ConfigError

# attention implementations that take a custom boolean 4-D mask (True = may attend)
_BOOL_MASK_ATTENTION = ("sdpa", "flex_attention")


def position_ids_for_left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each sequence's first real token (left padding shifts them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def is_cloze_batch(batch: dict[str, torch.Tensor]) -> bool:
    """Whether ``batch`` was collated from cloze-scored items (``blob_lora.tasks.cloze``)."""
    return "branch" in batch


def answer_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], option_ids: torch.Tensor | None
) -> torch.Tensor:
    """(B, C) class logits of a batch; absent options are -inf.

    Letter scoring: the logits of the answer tokens ``option_ids`` at the last position (only
    that position's vocabulary logits are computed, ``logits_to_keep=1``: the full (B, T, V)
    tensor would dominate time and memory for a 50k-token vocabulary). Cloze scoring (the
    batch says which): the options' log-likelihoods, see :func:`cloze_logits`; ``option_ids``
    is not used.
    """
    if is_cloze_batch(batch):
        return cloze_logits(model, batch)
    if option_ids is None:
        raise ValueError("letter scoring needs the answer-token ids (option_ids)")
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


def cloze_attention_mask(batch: dict[str, torch.Tensor], attn_implementation: str, dtype):
    """(B, 1, T, T) mask of packed cloze sequences: a token sees the earlier tokens of the
    shared prompt and of its own option, never another option's or padding.

    Boolean (True = attend) for SDPA/flex attention, additive (0 / most negative) for eager.
    A padding position attends to itself only, so no attention row is empty (no NaN).
    """
    branch = batch["branch"]
    real = batch["attention_mask"].bool()
    t = branch.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=branch.device).tril()
    same = (branch.unsqueeze(2) == branch.unsqueeze(1)) | (branch == 0).unsqueeze(1)
    allowed = causal & same & real.unsqueeze(1) & real.unsqueeze(2)
    allowed |= torch.eye(t, dtype=torch.bool, device=branch.device)
    allowed = allowed.unsqueeze(1)
    if attn_implementation in _BOOL_MASK_ATTENTION:
        return allowed
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=branch.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    raise ConfigError(
        f"cloze scoring packs the options of a question into one sequence with a custom "
        f"attention mask, which attention implementation {attn_implementation!r} does not "
        "take; load the model with attn_implementation='sdpa' or 'eager', or use --scoring letter"
    )


def _attention_setup(model: nn.Module) -> tuple[str, torch.dtype]:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    dtype = next(model.parameters()).dtype
    return impl, dtype if dtype.is_floating_point else torch.float32


def cloze_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, C) option log-likelihoods of packed cloze sequences, divided by ``divisor``.

    Score of option k = sum over its scored tokens i of log p(token_i | the token
    ``prev_offset[i]`` places back and everything it sees). Only the vocabulary logits of the
    last positions that predict a scored token are computed (``logits_to_keep``), and in
    float32.
    """
    impl, dtype = _attention_setup(model)
    target = batch["target_option"]
    rows, cols = (target >= 0).nonzero(as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("a cloze batch has no scored token")
    t = target.shape[1]
    predictor = cols - batch["prev_offset"][rows, cols]
    keep = int(t - predictor.min())
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=cloze_attention_mask(batch, impl, dtype),
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = out.logits  # (B, keep, V): positions t - keep .. t - 1
    at = predictor - (t - keep)
    picked = logits[rows, at].float()  # (M, V), one row per scored token
    token_logp = picked.gather(-1, batch["input_ids"][rows, cols].unsqueeze(-1)).squeeze(-1)
    token_logp = token_logp - torch.logsumexp(picked, -1)
    n_options = batch["option_mask"].shape[1]
    flat = rows * n_options + target[rows, cols]
    scores = torch.zeros(target.shape[0] * n_options, device=logits.device, dtype=torch.float32)
    scores = scores.index_add(0, flat, token_logp).view(-1, n_options)
    scores = scores / batch["divisor"].to(scores.device)
    mask = batch["option_mask"].to(device=scores.device, dtype=torch.bool)
    return scores.masked_fill(~mask, float("-inf"))


def repeat_batch(batch: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Fold ``times`` copies of a batch into the batch dimension (sample-major order)."""
    if times == 1:
        return batch
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in batch.items()}
