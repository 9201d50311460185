"""The core forward: a collated batch to answer-option logits (letter or cloze scoring), and the
sample folding every predictive uses.

Why in ``models``: training, the methods, the prefix reuse of ``models.prefix`` and prediction all
run this one forward, so it sits on the floor every one of them may import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal, get_args

import torch
from torch import nn

from blob_lora.tasks import option_logits
from blob_lora.utils.errors import ConfigError

# attention implementations that take a custom boolean 4-D mask (True = may attend)
_BOOL_MASK_ATTENTION = ("sdpa", "flex_attention")

#: which positions of a cloze batch the output head runs on (see :func:`cloze_logits`)
HeadPositions = Literal["suffix", "rows", "flat"]
HEAD_POSITIONS: tuple[str, ...] = get_args(HeadPositions)


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
    head_positions: HeadPositions = "flat",
) -> torch.Tensor:
    """(B, C) class logits of a batch; absent options are -inf.

    Letter scoring: the logits of the answer tokens ``option_ids`` at the last position (only
    that position's vocabulary logits are computed, ``logits_to_keep=1``: the full (B, T, V)
    tensor would dominate time and memory for a 50k-token vocabulary). Cloze scoring (the
    batch says which): the options' log-likelihoods, see :func:`cloze_logits` (and its
    ``head_positions``); ``option_ids`` is not used.
    """
    if is_cloze_batch(batch):
        return cloze_logits(model, batch, head_positions=head_positions)
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


@dataclass(frozen=True)
class AttentionSpans:
    """How far a model's layers look back (:func:`attention_spans`): a sliding ``window`` (a
    token sees the last ``window`` positions), attention in ``chunk``-position blocks (a
    token sees its own block), and which kind each layer is (``layer_types``; ``None``: every
    layer slides, as in Mistral and Phi-3, whose configs name no layer types)."""

    window: int | None = None
    chunk: int | None = None
    layer_types: tuple[str, ...] | None = None


def cloze_attention_mask(
    batch: dict[str, torch.Tensor],
    attn_implementation: str,
    dtype: torch.dtype,
    spans: AttentionSpans | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """(B, 1, T, T) mask of packed cloze sequences: a token sees the earlier tokens of the
    shared prompt and of its own option, never another option's or padding.

    Boolean (True = attend) for SDPA/flex attention, additive (0 / most negative) for eager.
    A padding position attends to itself only, so no attention row is empty (no NaN).

    ``spans``: the model's sliding window or attention chunks. A model handed a ready 4-D mask
    uses it as it is, so what its sliding or chunked layers would cut from a plain causal mask
    has to be cut here, by position (a packed option sits further from its prompt in the
    sequence than in its own text). Where nothing is cut, one mask serves every layer; where
    something is, a model whose layers all slide gets the windowed mask, and a model that mixes
    kinds of layers (Gemma 2/3, Qwen2 with ``use_sliding_window``, Llama 4's chunks) a mask per
    layer type, which such models take as a dict.
    """
    branch = batch["branch"]
    real = batch["attention_mask"].bool()
    t = branch.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=branch.device).tril()
    same = (branch.unsqueeze(2) == branch.unsqueeze(1)) | (branch == 0).unsqueeze(1)
    allowed = causal & same & real.unsqueeze(1) & real.unsqueeze(2)
    _check_implementation(attn_implementation)
    if spans is None:  # every layer sees the whole sequence (most models): nothing to cut
        return _mask_form(allowed, attn_implementation, dtype)
    forms = _layer_masks(allowed, batch["position_ids"].to(branch.device), spans)
    if all(torch.equal(m, allowed) for m in forms.values()):
        return _mask_form(allowed, attn_implementation, dtype)
    if spans.layer_types is None:
        return _mask_form(forms["sliding_attention"], attn_implementation, dtype)
    unknown = sorted(set(spans.layer_types) - set(forms))
    if unknown:
        limit = min(x for x in (spans.window, spans.chunk) if x)
        raise ConfigError(
            f"cloze scoring cannot mask the packed options for layers of type {unknown} when "
            f"the model's attention window or chunk ({limit} positions) is shorter than a "
            f"question; use a --max-length of at most {limit} or --scoring letter"
        )
    return {
        kind: _mask_form(forms[kind], attn_implementation, dtype)
        for kind in sorted(set(spans.layer_types))
    }


def _layer_masks(
    allowed: torch.Tensor, position: torch.Tensor, spans: AttentionSpans
) -> dict[str, torch.Tensor]:
    """The allowed pairs per layer type transformers names, cut by position as its own masks
    cut them by index (``q - kv < window``; the same ``position // chunk``)."""
    forms = {"full_attention": allowed}
    if spans.window:
        near = (position.unsqueeze(2) - position.unsqueeze(1)) < spans.window
        forms["sliding_attention"] = allowed & near
    if spans.chunk:
        block = torch.div(position, spans.chunk, rounding_mode="floor")
        forms["chunked_attention"] = allowed & (block.unsqueeze(2) == block.unsqueeze(1))
    return forms


def _mask_form(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, T) allowed pairs as the 4-D mask the implementation takes; every position may see
    itself (a padding row would otherwise be empty)."""
    t = allowed.shape[-1]
    allowed = (allowed | torch.eye(t, dtype=torch.bool, device=allowed.device)).unsqueeze(1)
    if attn_implementation in _BOOL_MASK_ATTENTION:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _check_implementation(attn_implementation: str) -> None:
    if attn_implementation not in _BOOL_MASK_ATTENTION and attn_implementation != "eager":
        raise ConfigError(
            f"cloze scoring packs the options of a question into one sequence with a custom "
            f"attention mask, which attention implementation {attn_implementation!r} does not "
            "take; load the model with attn_implementation='sdpa' or 'eager', or use "
            "--scoring letter"
        )


def check_cloze_support(model: nn.Module) -> None:
    """``ConfigError`` unless ``model`` can score packed cloze sequences: an attention
    implementation that takes a custom 4-D mask and no ALiBi biases
    (:func:`refuse_position_bias`). Every cloze forward checks both on its way
    (:func:`cloze_logits`); training checks once more before it creates the run folder, so
    a refused model leaves nothing behind."""
    refuse_position_bias(model)
    _check_implementation(_attention_setup(model)[0])


def refuse_position_bias(model: nn.Module) -> None:
    """``ConfigError`` for a model whose attention adds ALiBi biases (Bloom, MPT, Falcon with
    ``alibi``): cloze scoring packs a question's options into one sequence and tells the model
    each option's own positions through ``position_ids``, which such a model does not read (it
    takes distances from the sequence order, or from a 2-D mask), so every option after the
    first would be scored at the wrong distance from its prompt (a tiny MPT: 0.06 nats off;
    Bloom and Falcon fail on the 4-D mask). Letter scoring is not affected."""
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    attn_config = getattr(config, "attn_config", None)  # MPT's: an object, or a dict in its
    if isinstance(attn_config, dict):  # remote-code configs
        attn_config = SimpleNamespace(**attn_config)
    alibi = (
        model_type == "bloom"
        or getattr(config, "alibi", False) is True
        or getattr(attn_config, "alibi", False) is True
    )
    if alibi:
        raise ConfigError(
            f"cloze scoring packs the options of a question into one sequence with their own "
            f"positions, which a model with ALiBi attention biases ({model_type}) does not take; "
            "use --scoring letter"
        )


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "get_text_config", lambda: config)() if config is not None else None


def attention_spans(model: nn.Module) -> AttentionSpans | None:
    """The model's sliding window and attention chunks (:class:`AttentionSpans`), read from
    its (text) config; ``None`` when every layer sees the whole sequence."""
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None)
    layer_types = tuple(layer_types) if layer_types is not None else None

    def span(attribute: str, kind: str) -> int | None:
        value = getattr(config, attribute, None)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return None
        return value if layer_types is None or kind in layer_types else None

    window = span("sliding_window", "sliding_attention")
    chunk = span("attention_chunk_size", "chunked_attention") if layer_types else None
    if window is None and chunk is None:
        return None
    return AttentionSpans(window, chunk, layer_types)


def _attention_setup(model: nn.Module) -> tuple[str, torch.dtype]:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    dtype = next(model.parameters()).dtype
    return impl, dtype if dtype.is_floating_point else torch.float32


def cloze_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], *, head_positions: HeadPositions = "flat"
) -> torch.Tensor:
    """(B, C) option log-likelihoods of packed cloze sequences, divided by ``divisor``.

    Score of option k = sum over its scored tokens i of log p(token_i | the token
    ``prev_offset[i]`` places back and everything it sees). The vocabulary logits are computed
    in float32 and only where a scored token is predicted. ``head_positions`` says on which
    positions the output head runs; the logits of the positions read are the same for all three:

    * ``"suffix"``: the suffix of the batch that holds every predicting position
      (``logits_to_keep``), every row of it;
    * ``"rows"``: :func:`head_rows` hands the head only each row's own predicting positions,
      padded to the most any row needs (B, K);
    * ``"flat"`` (the default): as ``"rows"``, and every vocabulary-wide product of the head
      (its base matrix and a LoRA adapter's ``B``) runs only on the positions that are read,
      with no row padding (:func:`head_rows`); the adapter's ``A`` and any weight noise still
      see (B, K), one row per sequence, so a Bayesian adapter draws one weight sample per row
      as before.

    Why: the head (a vocabulary-wide matrix, as costly per position as several blocks) would
    otherwise run on every position of the suffix of every row, i.e. also on the other rows'
    longer option spans, on padding and on WinoGrande's unscored option contexts: 2-3x the
    positions that are read, and ``"rows"`` still ~2x (counted on the paper's tasks,
    ``bench/head_rows.py``). Laplace-LoRA uses ``"rows"``: KFAC's hooks need every watched
    layer's batch dimension, and its fit counts only the read slots (:func:`head_read_mask`).
    """
    if head_positions not in HEAD_POSITIONS:
        raise ValueError(f"head_positions must be one of {HEAD_POSITIONS}, not {head_positions!r}")
    refuse_position_bias(model)  # the implementation is checked by cloze_attention_mask
    impl, dtype = _attention_setup(model)
    target = batch["target_option"]
    rows, cols, at, keep = predicting_positions(batch)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": cloze_attention_mask(batch, impl, dtype, attention_spans(model)),
        "position_ids": batch["position_ids"],
        "logits_to_keep": keep,
        "use_cache": False,
    }
    head = _output_head(model) if head_positions != "suffix" else None
    where: tuple[torch.Tensor, ...] = (rows, at)  # entry m's logits in the head's output
    if head is None:
        logits = model(**inputs).logits  # (B, keep, V): positions t - keep .. t - 1
    else:
        flat = head_positions == "flat"
        with head_rows(head, rows, at, target.shape[0], keep, flat=flat) as plan:
            logits = model(**inputs).logits
        if plan.flattened:  # (T, V): the read positions, row after row
            if logits.dim() != 2 or logits.shape[0] != plan.n_read:
                raise RuntimeError(
                    f"the output head's logits have shape {tuple(logits.shape)} where the flat "
                    f"head gives ({plan.n_read}, vocabulary); pass head_positions='rows'"
                )
            where = (plan.flat_slot,)
        elif plan.applied:
            where = (rows, plan.slot)
    picked = logits[where].float()  # (M, V), one row per scored token
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
    the head's output when ``applied`` (the head saw the expected (B, keep, H) input); when
    ``flattened`` the head's output is (T, V), the read positions only, row after row, and
    entry m's logits are at ``flat_slot[m]``."""

    index: torch.Tensor  # (B, K): suffix positions handed to the head, row by row
    slot: torch.Tensor  # (M,): the column of ``index`` that holds entry m's position
    counts: torch.Tensor  # (B,): distinct positions each row needs (K = their maximum)
    rows: torch.Tensor  # (M,): entry m's row
    n_read: int  # T: the read positions, all rows together (``counts.sum()``)
    applied: bool = False
    flattened: bool = False

    @property
    def read(self) -> torch.Tensor:
        """(B, K) bool: which slots of ``index`` hold a position that is read (the others
        repeat the row's last one)."""
        width = self.index.shape[1]
        return torch.arange(width, device=self.counts.device) < self.counts.unsqueeze(1)

    @property
    def flat_slot(self) -> torch.Tensor:
        """(M,): entry m's position among the T = ``counts.sum()`` read positions."""
        starts = torch.cumsum(self.counts, 0) - self.counts
        return starts[self.rows] + self.slot


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
    return HeadRows(index=index, slot=col[inverse], counts=counts, rows=rows, n_read=uniq.numel())


#: An adapter layer whose forward adds up the outputs of some of its modules, each called on a
#: (B, K, .) input computed row by row, defines a method of this name: it returns those
#: modules (the base layer and each active adapter's ``lora_B`` for BLoB; the base layer and a
#: parameter-free module the adapters' summed output passes through for Bayesian-LoRA, which
#: multiplies factors it draws itself), or None while it cannot say (a LoRA variant or another
#: adapter kind is active beside it): ``head_positions="flat"`` may then cut those inputs to the
#: positions that are read. PEFT's own ``lora.Linear`` is known without it.
FLAT_PARTS = "flat_parts"


def head_read_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, K) bool of a cloze batch: which of the positions ``head_positions="rows"`` hands
    the output head are read (the rest pad a row to the most any row needs). Why public:
    Laplace-LoRA's KFAC counts only these as the head's inputs."""
    rows, _, at, _ = predicting_positions(batch)
    return head_plan(rows, at, batch["target_option"].shape[0]).read


def _flat_parts(head: nn.Module) -> list[nn.Module] | None:
    """The modules of ``head`` whose input can be cut to the read positions, so that the head
    returns (T, V): a plain head itself; for PEFT's own LoRA head, whose forward adds up its
    base layer and its adapters' ``lora_B`` outputs, the base layer (the vocabulary matrix) and
    each active adapter's ``lora_B``; for a layer that defines :data:`FLAT_PARTS`, what that
    returns. Its ``lora_A``, dropout and any weight noise keep the (B, K) rows, so a Bayesian
    adapter still draws one sample per row. None for any other head (a LoRA variant such as
    DoRA, an adapter that computes its product itself and says nothing): its rows are kept."""
    get = getattr(head, "get_base_layer", None)
    base = get() if callable(get) else head
    if base is head:
        return [head]
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    if not isinstance(head, LoraLayer) or not isinstance(base, nn.Module):
        return None
    own = getattr(head, FLAT_PARTS, None)
    if callable(own):
        return own()
    if type(head).forward is not LoraLinear.forward:
        return None
    active = [a for a in head.active_adapters if a in head.lora_B]
    if any(a in getattr(head, "lora_variant", {}) or head.use_dora.get(a) for a in active):
        return None
    return [base, *(head.lora_B[a] for a in active)]


@contextmanager
def head_rows(
    head: nn.Module,
    rows: torch.Tensor,
    at: torch.Tensor,
    batch_size: int,
    keep: int,
    *,
    flat: bool = False,
) -> Iterator[HeadRows]:
    """While active, ``head`` receives only the positions of :func:`head_plan` of its
    (B, keep, H) input. A forward pre-hook (removed on exit) rather than a second call of the
    head outside the model, so whatever the model does to the logits after the head (logit
    scaling, soft-capping) still happens. An input of any other shape passes unchanged
    (``applied`` stays False) and the caller reads the suffix as it is.

    ``flat``: the rows' spare slots are dropped too, where the head allows it
    (:func:`_flat_parts`): pre-hooks cut the (B, K, .) input of the vocabulary matrix and of
    each adapter's ``lora_B`` to the T read positions, so every vocabulary-wide tensor of the
    head is (T, V) rather than (B, K, V), and so are the logits the model returns
    (``flattened``).
    """
    plan = head_plan(rows, at, batch_size)
    width = plan.index.shape[1]

    def gather(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        expected = isinstance(x, torch.Tensor) and x.dim() == 3
        if not expected or tuple(x.shape[:2]) != (batch_size, keep):
            return None
        plan.applied = True
        index = plan.index.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return (x.gather(1, index), *args[1:])

    handles = [head.register_forward_pre_hook(gather)]
    read = plan.read
    parts = _flat_parts(head) if flat and not bool(read.all()) else None
    if parts:
        slots = read.flatten().nonzero().squeeze(1)  # the read slots of the (B * K) rows

        def cut(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0] if args else None
            if not plan.applied or not isinstance(x, torch.Tensor) or x.dim() != 3:
                return None
            if tuple(x.shape[:2]) != (batch_size, width):
                return None
            plan.flattened = True
            flat_x = x.reshape(-1, x.shape[-1]).index_select(0, slots.to(x.device))
            return (flat_x, *args[1:])

        handles += [m.register_forward_pre_hook(cut) for m in parts]
    try:
        yield plan
    finally:
        for h in handles:
            h.remove()


def repeat_batch(batch: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Fold ``times`` copies of a batch into the batch dimension (sample-major order)."""
    if times == 1:
        return batch
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in batch.items()}
