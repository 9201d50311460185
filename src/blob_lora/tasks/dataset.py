"""Tokenised multiple-choice examples, their collation into left-padded batches, and caching.

Truncation works on tokens: the prompt is tokenised whole (so the cue and options get exactly
the tokens they would get untruncated) and, if it is longer than ``max_length``, tokens lying
entirely inside the truncatable segments are removed: first from the end of the
context/passage, then from the start of the question. A ``DataError`` is raised when even the
prompt with no passage or question left does not fit. This needs a fast tokenizer (offsets).

Tokenised splits are cached in-process (LRU, keyed by tokenizer fingerprint, task, data
fingerprint, split and max_length) and, with ``cache_dir``, on disk as JSON written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from blob_lora.tasks.cloze import cloze_prompt, option_text, scored_chars
from blob_lora.tasks.examples import MCExample
from blob_lora.tasks.prompts import TRUNCATION_ORDER, Segment
from blob_lora.tasks.scoring import LETTER, Scoring, scoring_option_ids
from blob_lora.utils.atomic import atomic_write_text
from blob_lora.utils.caller import outside_stacklevel
from blob_lora.utils.errors import ConfigError, ExampleError, OverlongError

log = logging.getLogger(__name__)

# bump when prompts, tokenisation or the stored fields change, to invalidate old caches
# (2: per-example truncation flags instead of a count)
CACHE_FORMAT = 2
CLOZE_FORMAT = 1  # the same for cloze prompts and packing
LRU_SIZE = 16
_ENCODE_CHUNK = 512


# ---------------------------------------------------------------------------------------------
# tokenizer identity and special tokens


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts *before* text with ``add_special_tokens=True`` (Llama's BOS).

    Anything it appends after the text (an EOS) is dropped: the last position must be the cue.
    """
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's full definition (vocab, merges, normaliser, added tokens)."""
    size = len(tokenizer)
    try:
        cached = _FINGERPRINTS.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(json.dumps(special_prefix(tokenizer)).encode())
    digest = h.hexdigest()
    with contextlib.suppress(TypeError):  # an object that cannot be weakly referenced
        _FINGERPRINTS[tokenizer] = (size, digest)
    return digest


# ---------------------------------------------------------------------------------------------
# encoding with truncation


def _spans(segments: Sequence[Segment]) -> dict[str, tuple[int, int]]:
    spans, pos = {}, 0
    for seg in segments:
        if seg.role is not None:
            spans[seg.role] = (pos, pos + len(seg.text))
        pos += len(seg.text)
    return spans


def _truncate(
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: dict[str, tuple[int, int]],
    excess: int,
) -> tuple[list[int], int]:
    """Drop ``excess`` tokens from the truncatable spans; return kept ids and what is left over."""
    drop: set[int] = set()
    for role in TRUNCATION_ORDER:
        if excess <= 0 or role not in spans:
            continue
        start, end = spans[role]
        inside = [i for i, (s, e) in enumerate(offsets) if e > s and s >= start and e <= end]
        k = min(excess, len(inside))
        if k:
            # the context keeps its start, the question keeps its end (next to the options)
            drop.update(inside[-k:] if role == TRUNCATION_ORDER[0] else inside[:k])
            excess -= k
    return [t for i, t in enumerate(ids) if i not in drop], excess


def _check_encoding_args(tokenizer, max_length: int) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "MCDataset needs a fast (Rust 'tokenizers') tokenizer: truncation uses its "
            f"character offsets; got {type(tokenizer).__name__}"
        )
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ConfigError(f"max_length must be a positive int, got {max_length!r}")


def encode_examples(
    task, examples: Sequence[MCExample], tokenizer, max_length: int
) -> tuple[list[list[int]], list[bool]]:
    """Token ids of every example's prompt (special prefix included), and whether each was cut."""
    _check_encoding_args(tokenizer, max_length)
    prefix = special_prefix(tokenizer)
    out: list[list[int]] = []
    truncated: list[bool] = []
    for lo in range(0, len(examples), _ENCODE_CHUNK):
        chunk = examples[lo : lo + _ENCODE_CHUNK]
        segs = [task.prompt_segments(ex) for ex in chunk]
        texts = ["".join(s.text for s in sg) for sg in segs]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ex, sg, ids, offs in zip(
            chunk, segs, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            ids = list(ids)
            excess = len(prefix) + len(ids) - max_length
            if excess > 0:
                spans = _spans(sg)
                ids, left = _truncate(ids, [tuple(o) for o in offs], spans, excess)
                if left > 0:
                    need = max_length + left  # what is left after every cut
                    raise OverlongError(
                        f"task {task.name!r}, example {ex.id!r}: the prompt needs {need} tokens "
                        f"even with no passage or question text left (options and the "
                        f"'Answer:' cue are never cut), more than max_length={max_length}",
                        example_id=ex.id,
                        needed=need,
                        line=ex.line,
                    )
            truncated.append(excess > 0)
            out.append(prefix + ids)
    return out, truncated


CLOZE_FIELDS = ("branch", "position", "target_option", "prev_offset", "divisor")
"""Per-item fields of a cloze-scored example besides ``input_ids`` (see ``encode_cloze_examples``)."""


def _option_tokens(tokenizer, shared_text: str, shared_ids: list[int], text: str, context: str):
    """Token ids of one option's text after the shared prompt, and which of them are scored.

    Tokenised as part of ``shared + option`` (lm-evaluation-harness's way, so a tokenizer that
    merges across the boundary or adds a word-initial marker gets the tokens it would really
    produce); if the shared prompt's tokens are then not a prefix, the option is tokenised on
    its own. A token is scored when it ends after the option's unscored ``context``.
    """
    enc = tokenizer(shared_text + text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    n = len(shared_ids)
    if ids[:n] == shared_ids:
        ids, offs = ids[n:], [(a - len(shared_text), b - len(shared_text)) for a, b in offs[n:]]
    else:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    scored = [e > len(context) or (e <= s and s >= len(context)) for s, e in offs]
    return ids, scored


def encode_cloze_examples(
    task, examples: Sequence[MCExample], tokenizer, max_length: int, length_norm: str = "none"
) -> tuple[list[dict[str, list]], list[bool]]:
    """Every example as one packed cloze sequence (``blob_lora.tasks.cloze``), and whether each
    was cut.

    An item holds, per token: ``input_ids``; ``branch`` (0: the special prefix and the shared
    prompt, ``k + 1``: option ``k``); ``position`` (its position id: an option's positions
    continue from the prompt's end); ``target_option`` (the option whose score this token's
    log-probability adds to, -1 if none); ``prev_offset`` (how many places back the token that
    predicts it stands: 1 inside an option, up to the prompt's last token for an option's first
    token); and per option ``divisor`` (1, its scored tokens or its scored characters, as
    ``length_norm`` says). Only the shared prompt's passage/question is ever truncated.
    """
    _check_encoding_args(tokenizer, max_length)
    prefix = special_prefix(tokenizer)
    items: list[dict[str, list]] = []
    truncated: list[bool] = []
    for ex in examples:
        prompt = cloze_prompt(ex, task.style)
        shared_text = "".join(seg.text for seg in prompt.shared)
        enc = tokenizer(shared_text, add_special_tokens=False, return_offsets_mapping=True)
        shared_ids = list(enc["input_ids"])
        options = [
            _option_tokens(tokenizer, shared_text, shared_ids, option_text(o), o.context)
            for o in prompt.options
        ]
        for k, (_, scored) in enumerate(options):
            if not any(scored):
                raise ExampleError(
                    f"task {task.name!r}, example {ex.id!r}: option {k} has no text to score",
                    example_id=ex.id,
                    line=ex.line,
                )
        excess = len(prefix) + len(shared_ids) + sum(len(ids) for ids, _ in options) - max_length
        if excess > 0:
            offsets = [tuple(o) for o in enc["offset_mapping"]]
            shared_ids, left = _truncate(shared_ids, offsets, _spans(prompt.shared), excess)
            if left > 0:
                raise OverlongError(
                    f"task {task.name!r}, example {ex.id!r}: the cloze sequence needs "
                    f"{max_length + left} tokens even with no passage or question text left "
                    f"(the options are never cut), more than max_length={max_length}",
                    example_id=ex.id,
                    needed=max_length + left,
                    line=ex.line,
                )
        truncated.append(excess > 0)
        head = prefix + shared_ids
        item: dict[str, list] = {
            "input_ids": list(head),
            "branch": [0] * len(head),
            "position": list(range(len(head))),
            "target_option": [-1] * len(head),
            "prev_offset": [0] * len(head),
        }
        for k, (ids, scored) in enumerate(options):
            for j, (tok, is_scored) in enumerate(zip(ids, scored, strict=True)):
                if is_scored and j == 0 and not head:
                    raise ExampleError(
                        f"task {task.name!r}, example {ex.id!r}: option {k} starts with a "
                        "scored token but nothing precedes it to predict it",
                        example_id=ex.id,
                        line=ex.line,
                    )
                item["input_ids"].append(tok)
                item["branch"].append(k + 1)
                item["position"].append(len(head) + j)
                item["target_option"].append(k if is_scored else -1)
                # the token before it in its own option, or the prompt's last token
                back = 1 if j > 0 else len(item["input_ids"]) - len(head)
                item["prev_offset"].append(back if is_scored else 0)
        if length_norm == "token":
            item["divisor"] = [float(sum(scored)) for _, scored in options]
        elif length_norm == "char":
            item["divisor"] = [float(c) for c in scored_chars(prompt.options)]
        else:
            item["divisor"] = [1.0] * len(options)
        items.append(item)
    return items, truncated


# ---------------------------------------------------------------------------------------------
# caches


@dataclass(frozen=True)
class EncodedSplit:
    """Examples tokenised for scoring, one entry per example (see :func:`encode_split`)."""

    input_ids: list[list[int]]
    labels: list[int]
    n_options: list[int]
    example_ids: list[str]
    #: per example, whether its passage or question was cut to fit ``max_length``
    truncated: list[bool]
    #: cloze scoring: per item, the ``CLOZE_FIELDS`` lists; ``None`` under letter scoring
    cloze: list[dict[str, list]] | None = None

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated)


_LRU: OrderedDict[str, EncodedSplit] = OrderedDict()


def clear_cache() -> None:
    """Forget every in-process tokenised split (the on-disk cache is left alone)."""
    _LRU.clear()


def _cache_key(
    task, split: str, tokenizer, max_length: int, scoring: Scoring = LETTER
) -> tuple[str, dict[str, Any]]:
    parts: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "task": task.name,
        "style": task.style,
        "letters": list(task.option_letters),
        "data": task.source_fingerprint(split),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
    }
    if scoring.is_cloze:  # letter keys stay as they were, so existing caches stay valid
        parts["scoring"] = [scoring.mode, scoring.length_norm, CLOZE_FORMAT]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return digest, parts


def _disk_path(cache_dir: str | Path, digest: str) -> Path:
    return Path(cache_dir) / "tokenized" / f"{digest}.json"


def _read_disk(path: Path, parts: dict[str, Any]) -> EncodedSplit | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if obj.get("key") != parts:
            return None
        return EncodedSplit(
            obj["input_ids"],
            obj["labels"],
            obj["n_options"],
            obj["ids"],
            _truncated_flags(obj["truncated"], len(obj["ids"])),
            obj.get("cloze"),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # corrupt cache: rebuild it
        log.warning("ignoring unreadable tokenisation cache %s: %s", path, e)
        return None


def _truncated_flags(value: Any, n: int) -> list[bool]:
    """The cache's per-example flags, checked: a cache written before they were stored (it held
    a count) or a damaged one raises ``KeyError``/``TypeError`` and is rebuilt."""
    if (
        not isinstance(value, list)
        or len(value) != n
        or not all(isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"'truncated' must be {n} booleans")
    return value


def _write_disk(path: Path, parts: dict[str, Any], enc: EncodedSplit) -> None:
    obj = {
        "key": parts,
        "input_ids": enc.input_ids,
        "labels": enc.labels,
        "n_options": enc.n_options,
        "ids": enc.example_ids,
        "truncated": enc.truncated,
    }
    if enc.cloze is not None:
        obj["cloze"] = enc.cloze
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")))


# ---------------------------------------------------------------------------------------------
# dataset, collator, sampler


def encode_split(
    task, examples: Sequence[MCExample], tokenizer, max_length: int, scoring: Scoring = LETTER
) -> EncodedSplit:
    """Tokenise ``examples`` for ``scoring`` (one item per example in either mode)."""
    cloze = None
    if scoring.is_cloze:
        items, truncated = encode_cloze_examples(
            task, examples, tokenizer, max_length, scoring.length_norm
        )
        ids = [it.pop("input_ids") for it in items]
        cloze = items
    else:
        ids, truncated = encode_examples(task, examples, tokenizer, max_length)
    return EncodedSplit(
        ids,
        [ex.label for ex in examples],
        [ex.n_options for ex in examples],
        [ex.id for ex in examples],
        truncated,
        cloze,
    )


def _warn_repeated_options(task, split: str, examples: Sequence[MCExample]) -> None:
    """Under cloze scoring two options of the same text get the same score, so the answer
    can never be told from its twin (at most half the probability): say which questions.
    Letter scoring tells them apart by their letters."""
    repeated = [ex.id for ex in examples if len(set(ex.choices)) < len(ex.choices)]
    if repeated:
        shown = ", ".join(repeated[:5]) + (", ..." if len(repeated) > 5 else "")
        warnings.warn(
            f"task {task.name!r}, split {split!r}: {len(repeated)} question(s) repeat an "
            f"option's text ({shown}); cloze scoring gives both copies the same score",
            UserWarning,
            stacklevel=outside_stacklevel(),
        )


@contextlib.contextmanager
def naming_the_file(task, split: str) -> Iterator[None]:
    """Add the file and line of ``split`` to an ``ExampleError`` raised inside.

    Why: a question that cannot be prompted is found when its split is tokenised, where only
    the task and the question's id are known; the task knows the file it read
    (``Task.where``), and the error carries the question's line in it. Only errors about one
    question are named so: another ``DataError`` names its own file, once. A task object
    without ``where`` (a test double's) adds nothing.
    """
    try:
        yield
    except ExampleError as e:
        where = getattr(task, "where", None)
        if where is not None:
            e.args = (f"{e.args[0]}{where(split, e.line)}", *e.args[1:])
        raise


def fitting_examples(
    task, examples: Sequence[MCExample], tokenizer, max_length: int, scoring: Scoring = LETTER
) -> tuple[list[MCExample], dict[str, int]]:
    """``(kept, overlong)``: the examples whose prompt fits ``max_length`` once its passage or
    question is cut (as :func:`encode_split` cuts them), in their order, and the ids of the
    others with the tokens each would need. Why: a collection of many tasks (MMLU's 57) may
    hold a few questions whose options alone exceed the budget; its caller decides whether to
    stop or to leave them out. Encodes the examples once when all fit (the usual case), one by
    one otherwise. Any other bad record still raises its ``DataError``."""
    try:
        encode_split(task, list(examples), tokenizer, max_length, scoring)
        return list(examples), {}
    except OverlongError:
        pass
    kept: list[MCExample] = []
    overlong: dict[str, int] = {}
    for ex in examples:
        try:
            encode_split(task, [ex], tokenizer, max_length, scoring)
        except OverlongError as exc:
            overlong[exc.example_id] = exc.needed
        else:
            kept.append(ex)
    return kept, overlong


class EncodedDataset(Dataset):
    """Tokenised examples for scoring: items are ``dict(input_ids, label, n_options)``.

    ``input_ids`` is the (possibly truncated) prompt with the tokenizer's leading special
    tokens, ending at the answer cue. ``lengths`` gives each item's token count (for
    bucketing), ``example_ids`` the source ids, ``truncated`` which prompts were cut.
    Under cloze scoring an item is the packed sequence of the question and all its options
    and also carries the ``CLOZE_FIELDS`` (see ``encode_cloze_examples``). Built from
    :func:`encode_split` (``Predictor``'s in-memory questions); a task split is an
    :class:`MCDataset`.
    """

    def __init__(self, encoded: EncodedSplit) -> None:
        self._enc = encoded

    def __len__(self) -> int:
        return len(self._enc.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self._enc
        item = {"input_ids": e.input_ids[i], "label": e.labels[i], "n_options": e.n_options[i]}
        if e.cloze is not None:
            item.update(e.cloze[i])
        return item

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self._enc.input_ids]

    @property
    def example_ids(self) -> list[str]:
        return list(self._enc.example_ids)

    @property
    def n_truncated(self) -> int:
        return self._enc.n_truncated

    @property
    def truncated(self) -> list[bool]:
        """Per item, whether its passage or question was cut to fit the prompt length."""
        return list(self._enc.truncated)


class MCDataset(EncodedDataset):
    """A task split tokenised for scoring (see :class:`EncodedDataset` for the items).

    ``cache_hit`` says whether this split came from the in-process or on-disk cache;
    ``digest`` identifies the tokenised content (task data, split, tokenizer, max_length,
    scoring).
    """

    def __init__(
        self,
        task,
        split: str,
        tokenizer,
        max_length: int,
        cache_dir: str | Path | None = None,
        scoring: Scoring = LETTER,
    ):
        self.task = task
        self.split = split
        self.max_length = max_length
        self.scoring = scoring
        digest, parts = _cache_key(task, split, tokenizer, max_length, scoring)
        #: identifies the tokenised content (task data, split, tokenizer, max_length)
        self.digest = digest
        enc = _LRU.get(digest)
        self.cache_hit = "memory" if enc is not None else None
        if enc is None and cache_dir is not None:
            enc = _read_disk(_disk_path(cache_dir, digest), parts)
            self.cache_hit = "disk" if enc is not None else None
        if enc is None:
            examples = task.load(split)
            if scoring.is_cloze:  # once per split read, not per batch or episode encoded
                _warn_repeated_options(task, split, examples)
            with naming_the_file(task, split):
                enc = encode_split(task, examples, tokenizer, max_length, scoring)
            if cache_dir is not None:
                _write_disk(_disk_path(cache_dir, digest), parts, enc)
        _LRU[digest] = enc
        _LRU.move_to_end(digest)
        while len(_LRU) > LRU_SIZE:
            _LRU.popitem(last=False)
        super().__init__(enc)


# cloze item field -> (batch key, padding value)
_CLOZE_PADDING = {
    "position": ("position_ids", 0),
    "branch": ("branch", -1),
    "target_option": ("target_option", -1),
    "prev_offset": ("prev_offset", 0),
}


class MCCollator:
    """Left-pads items into ``input_ids`` (B,T) long, ``attention_mask`` (B,T) long,
    ``labels`` (B,) long and ``option_mask`` (B,C) bool, C = the task's ``n_options``.

    Left padding puts every prompt's cue at the last position, where logits are read.
    ``pad_token_id`` is passed in because many causal-LM tokenizers have no pad token
    (callers use EOS); padded positions are masked out, so its value does not matter.

    Cloze-scored items (they carry ``branch``) also give ``position_ids``, ``branch`` (-1 on
    padding), ``target_option`` (-1 on padding), ``prev_offset`` (B,T) long and ``divisor``
    (B,C) float (1 for absent options), read by ``blob_lora.models.forward``.
    """

    def __init__(self, pad_token_id: int, n_options: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ConfigError("pad_token_id is None: pass the tokenizer's eos_token_id instead")
        self.pad_token_id = int(pad_token_id)
        self.n_options = int(n_options)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        b = len(items)
        t = max(len(it["input_ids"]) for it in items)
        m = self.pad_to_multiple_of
        if m:
            t = -(-t // m) * m
        input_ids = torch.full((b, t), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        n_opts = torch.tensor([int(it["n_options"]) for it in items], dtype=torch.long)
        labels = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
        if int(n_opts.max()) > self.n_options:
            raise ValueError(
                f"an item has {int(n_opts.max())} options, collator has {self.n_options}"
            )
        if bool(((labels < 0) | (labels >= n_opts)).any()):
            raise ValueError("a label is outside its item's options")
        for i, it in enumerate(items):
            ids = it["input_ids"]
            n = len(ids)
            if n:
                input_ids[i, t - n :] = torch.as_tensor(ids, dtype=torch.long)
                attention_mask[i, t - n :] = 1
        option_mask = torch.arange(self.n_options).unsqueeze(0) < n_opts.unsqueeze(1)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "option_mask": option_mask,
        }
        if "branch" in items[0]:
            batch.update(self._cloze_fields(items, t))
        return batch

    def _cloze_fields(self, items: Sequence[dict[str, Any]], t: int) -> dict[str, torch.Tensor]:
        out = {}
        for field_name, (key, pad) in _CLOZE_PADDING.items():
            col = torch.full((len(items), t), pad, dtype=torch.long)
            for i, it in enumerate(items):
                values = it[field_name]
                if values:
                    col[i, t - len(values) :] = torch.as_tensor(values, dtype=torch.long)
            out[key] = col
        divisor = torch.ones((len(items), self.n_options), dtype=torch.float32)
        for i, it in enumerate(items):
            divisor[i, : len(it["divisor"])] = torch.as_tensor(it["divisor"], dtype=torch.float32)
        out["divisor"] = divisor
        return out


#: collated fields with one value per token (B, T): the ones cut when a batch is split
TOKEN_FIELDS = ("input_ids", "attention_mask", *(key for key, _ in _CLOZE_PADDING.values()))


def split_by_length(batch: dict[str, torch.Tensor], chunks: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` (an ``MCCollator`` batch, with or without ``index``) as up to ``chunks``
    batches of its rows sorted by length, each cut to its own longest row.

    Why: a batch is padded to its longest example, and the paper's training sets differ in
    length by 2-3x: a random batch of 8 runs 1.3-1.8x its real tokens through every block.
    Forwarding the same rows in chunks of similar length and summing their losses gives the
    same gradient with less padding (``--length-chunks``). Rows keep their order within a
    chunk where lengths tie; left padding means a chunk's rows end at the last column, so
    cutting keeps every row's tokens and the cloze fields (positions, branches, offsets back
    to the previous token) as they were.
    """
    n = len(batch["attention_mask"])
    chunks = min(chunks, n)
    if chunks <= 1:
        return [batch]
    lengths = batch["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True)
    out = []
    for rows in torch.tensor_split(order, chunks):
        t = int(lengths[rows].max())
        part = {}
        for key, value in batch.items():
            value = value.index_select(0, rows.to(value.device))
            part[key] = value[:, value.shape[1] - t :] if key in TOKEN_FIELDS else value
        out.append(part)
    return out


class LengthBucketedBatchSampler(Sampler[list[int]]):
    """Batches of indices with similar lengths, to waste less compute on padding.

    Indices are (optionally) shuffled with ``seed + epoch``, cut into pools of
    ``batch_size * pool_factor``, each pool sorted by length and cut into batches; with
    ``shuffle`` the batch order is shuffled too. Every index appears exactly once per epoch
    unless ``drop_last`` (never use that for evaluation). Call ``set_epoch`` each epoch.

    ``short_last``: the one batch shorter than ``batch_size`` (the last pool's remainder) comes
    last instead of wherever the shuffle puts it. Needed when Accelerate shards the batches
    over processes: it hands out a round of batches only if the round's last one is full, so
    a short batch shuffled into the middle lost its whole round (measured: 10 examples at
    batch 4 on 2 processes, 2 of 3 batches given out), and it completes the epoch's last
    round only after the short batch. Training uses it on any number of processes, so that
    the order, and the examples a resume on another process count skips, do not depend on it.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        pool_factor: int = 50,
        drop_last: bool = False,
        short_last: bool = False,
    ):
        if batch_size < 1 or pool_factor < 1:
            raise ConfigError("batch_size and pool_factor must be positive")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool_factor = pool_factor
        self.drop_last = drop_last
        self.short_last = short_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        pool = self.batch_size * self.pool_factor
        batches: list[list[int]] = []
        for lo in range(0, len(order), pool):
            chunk = sorted(order[lo : lo + pool], key=lambda i: self.lengths[i])
            batches += [
                chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)
            ]
        if self.drop_last:
            batches = [bt for bt in batches if len(bt) == self.batch_size]
        short = []
        if self.short_last and batches and len(batches[-1]) < self.batch_size:
            short = [batches.pop()]  # the last pool's remainder: the only short batch
        if self.shuffle:
            rng.shuffle(batches)
        return iter(batches + short)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def length_bucketed_sampler(
    dataset_or_lengths: MCDataset | Sequence[int], batch_size: int, **kwargs: Any
) -> LengthBucketedBatchSampler:
    """A ``LengthBucketedBatchSampler`` for ``DataLoader(ds, batch_sampler=...)``."""
    lengths = (
        dataset_or_lengths.lengths
        if isinstance(dataset_or_lengths, MCDataset)
        else dataset_or_lengths
    )
    return LengthBucketedBatchSampler(lengths, batch_size, **kwargs)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Every index once, in batches of similar length, longest first: for scoring a split.

    Consecutive examples of a split differ in length by up to 2-3x, and a batch is padded to
    its longest: on the regime table's evaluation splits under cloze scoring sequential batches
    of 16 run 1.3-2.2x the real tokens through every block, these batches 1.00-1.2x (issue 19,
    bench/README.md; the prefix cache stores features per example). Longest first,
    so a batch too large for the device fails at once, not at the end of a long pass. Ties
    keep dataset order, so the batches are a function of the lengths alone.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class IndexedDataset(Dataset):
    """An ``EncodedDataset`` whose items also carry their position (``index``): prediction
    puts its results back in order with it, and the prefix cache looks examples up by it."""

    def __init__(self, base: EncodedDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.base[i], "index": i}


class IndexedCollator:
    """``MCCollator`` plus an ``index`` (B,) long tensor of the items' dataset positions."""

    def __init__(self, collator: MCCollator) -> None:
        self.collator = collator

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator([{k: v for k, v in it.items() if k != "index"} for it in items])
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return batch


@dataclass(frozen=True)
class TaskInputs:
    """What a loop over a task split needs: the dataset, its collator and, for letter
    scoring, the answer-token ids (``None`` under cloze scoring)."""

    dataset: MCDataset
    collator: MCCollator
    option_ids: torch.Tensor | None


def task_inputs(
    task,
    split: str,
    tokenizer,
    max_length: int,
    *,
    scoring: Scoring = LETTER,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
) -> TaskInputs:
    """Tokenise ``task``'s ``split`` for ``scoring`` and build its collator and option ids; an
    empty split (nothing to train on or to score) is a ``DataError`` naming its file."""
    dataset = MCDataset(task, split, tokenizer, max_length, cache_dir=cache_dir, scoring=scoring)
    if len(dataset) == 0:
        raise task.no_examples(split)
    option_ids = scoring_option_ids(tokenizer, task, scoring)
    if option_ids is not None and device is not None:
        option_ids = option_ids.to(device)
    return TaskInputs(dataset, MCCollator(tokenizer.pad_token_id, task.n_options), option_ids)
