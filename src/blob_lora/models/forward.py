"""The core forward: a collated batch to answer-option logits (letter or cloze scoring), and the
sample folding every predictive uses.

Why in ``models``: training, the methods, the prefix reuse of ``models.prefix`` and prediction all
run this one forward, so it sits on the floor every one of them may import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    option_ids: torch.Tensor | None,
    *,
    gather_head: bool = True,
) -> torch.Tensor:
    """(B, C) class logits of a batch; absent options are -inf.

    Letter scoring: the logits of the answer tokens ``option_ids`` at the last position (only
    that position's vocabulary logits are computed, ``logits_to_keep=1``: the full (B, T, V)
    tensor would dominate time and memory for a 50k-token vocabulary). Cloze scoring (the
    batch says which): the options' log-likelihoods, see :func:`cloze_logits` (and its
    ``gather_head``); ``option_ids`` is not used.
    """
    if is_cloze_batch(batch):
        return cloze_logits(model, batch, gather_head=gather_head)
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


def cloze_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], *, gather_head: bool = True
) -> torch.Tensor:
    """(B, C) option log-likelihoods of packed cloze sequences, divided by ``divisor``.

    Score of option k = sum over its scored tokens i of log p(token_i | the token
    ``prev_offset[i]`` places back and everything it sees). The vocabulary logits are computed
    in float32 and only where a scored token is predicted: the model keeps the suffix that
    holds every such position (``logits_to_keep``), and with ``gather_head`` (the default)
    :func:`head_rows` hands the output head only each row's own predicting positions.

    Why the gather: the head (a vocabulary-wide matrix, as costly per position as several
    blocks) would otherwise run on every position of the suffix of every row, i.e. also on the
    other rows' longer option spans, on padding and on WinoGrande's unscored option contexts:
    2-3x the positions that are read (counted on the paper's tasks, ``bench/head_rows.py``).
    The logits of the positions read are the same either way. ``gather_head=False`` keeps
    the suffix whole (Laplace-LoRA's KFAC maps the head's input positions onto the attention
    mask's last columns, so its fit uses this).
    """
    impl, dtype = _attention_setup(model)
    target = batch["target_option"]
    rows, cols, at, keep = predicting_positions(batch)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": cloze_attention_mask(batch, impl, dtype),
        "position_ids": batch["position_ids"],
        "logits_to_keep": keep,
        "use_cache": False,
    }
    head = _output_head(model) if gather_head else None
    if head is None:
        logits = model(**inputs).logits  # (B, keep, V): positions t - keep .. t - 1
    else:
        with head_rows(head, rows, at, target.shape[0], keep) as plan:
            logits = model(**inputs).logits
        at = plan.slot if plan.applied else at
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


def predicting_positions(
    batch: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Where a cloze batch's scored tokens are and which positions predict them:
    ``(rows, cols, at, keep)``, one entry per scored token at ``(rows, cols)``, predicted by
    position ``at`` of the last ``keep`` positions (the shortest suffix holding them all)."""
    target = batch["target_option"]
    rows, cols = (target >= 0).nonzero(as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("a cloze batch has no scored token")
    t = target.shape[1]
    predictor = cols - batch["prev_offset"][rows, cols]
    keep = int(t - predictor.min())
    return rows, cols, predictor - (t - keep), keep


def _output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps the last hidden states to vocabulary logits, or None.

    Looks through distributed wrappers (``.module``); PEFT models forward the call to the
    transformers model, whose ``get_output_embeddings`` is the (adapted) ``lm_head``.
    """
    inner = model
    while not hasattr(inner, "get_output_embeddings") and isinstance(
        getattr(inner, "module", None), nn.Module
    ):
        inner = inner.module
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


@dataclass
class HeadRows:
    """What :func:`head_rows` did: ``slot[m]`` is where entry m's logits sit in each row of
    the head's output when ``applied`` (the head saw the expected (B, keep, H) input)."""

    index: torch.Tensor  # (B, K): suffix positions handed to the head, row by row
    slot: torch.Tensor  # (M,): the column of ``index`` that holds entry m's position
    counts: torch.Tensor  # (B,): distinct positions each row needs (K = their maximum)
    applied: bool = False


def head_plan(rows: torch.Tensor, at: torch.Tensor, batch_size: int) -> HeadRows:
    """Each row's distinct positions of ``at`` (entries ``rows``), left-aligned in a (B, K)
    index, K = the most any row needs; a row's spare slots repeat its last position (their
    logits are computed and never read)."""
    span = int(at.max()) + 1
    uniq, inverse = torch.unique(rows * span + at, return_inverse=True)  # row-major, sorted
    urow, upos = torch.div(uniq, span, rounding_mode="floor"), uniq % span
    counts = torch.bincount(urow, minlength=batch_size)
    col = torch.arange(uniq.numel(), device=uniq.device) - (torch.cumsum(counts, 0) - counts)[urow]
    last = torch.zeros(batch_size, dtype=torch.long, device=at.device)
    last[urow] = upos  # uniq is sorted, so the last write per row is its largest position
    index = last.unsqueeze(1).repeat(1, int(counts.max()))
    index[urow, col] = upos
    return HeadRows(index=index, slot=col[inverse], counts=counts)


@contextmanager
def head_rows(
    head: nn.Module, rows: torch.Tensor, at: torch.Tensor, batch_size: int, keep: int
) -> Iterator[HeadRows]:
    """While active, ``head`` receives only the positions of :func:`head_plan` of its
    (B, keep, H) input. A forward pre-hook (removed on exit) rather than a second call of the
    head outside the model, so whatever the model does to the logits after the head (logit
    scaling, soft-capping) still happens. An input of any other shape passes unchanged
    (``applied`` stays False) and the caller reads the suffix as it is."""
    plan = head_plan(rows, at, batch_size)

    def gather(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        expected = isinstance(x, torch.Tensor) and x.dim() == 3
        if not expected or tuple(x.shape[:2]) != (batch_size, keep):
            return None
        plan.applied = True
        index = plan.index.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return (x.gather(1, index), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield plan
    finally:
        handle.remove()


def repeat_batch(batch: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Fold ``times`` copies of a batch into the batch dimension (sample-major order)."""
    if times == 1:
        return batch
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in batch.items()}
