"""The questions of a meta-learning run as model inputs: every task of the collection loaded
once, its seeded split into meta-train and meta-test tasks, and examples turned into the
batches ABMLL adapts on and the datasets prediction scores.

Shared by ``meta_train`` and ``meta_evaluate`` so that both read the same split from the same
``MetaConfig``: the evaluation of a saved run re-creates exactly the held-out tasks and their
support sets.

Every adaptation forwards the same support batches ``inner_steps`` times. With adapters on the
top blocks only, the blocks below are frozen and deterministic, so the task NLLs made here
(``prefix_cache``, on by default) run them once per batch and each inner step only through the
adapted top (``models.prefix_cache.BatchPrefixCache``): the same numbers, fewer forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blob_lora.methods.abmll import answer_nll
from blob_lora.models.prefix_cache import BatchPrefixCache
from blob_lora.pipeline.meta_config import MetaConfig
from blob_lora.tasks.collection import TaskPool, collection_names, load_pool, split_tasks
from blob_lora.tasks.dataset import (
    EncodedDataset,
    MCCollator,
    encode_split,
    fitting_examples,
    naming_the_file,
)
from blob_lora.tasks.examples import MCExample
from blob_lora.tasks.scoring import Scoring, scoring_option_ids
from blob_lora.tuners.abmll import AbmllConfig
from blob_lora.tuners.abmll.meta import Batch, Nll
from blob_lora.utils.errors import DataError


@dataclass(frozen=True)
class MetaSplit:
    """The collection's tasks, loaded, by role; ``overlong``: per task, the questions
    :func:`fit_split` left out (id -> the tokens each would need)."""

    train: list[TaskPool]
    test: list[TaskPool]
    overlong: dict[str, dict[str, int]] = field(default_factory=dict)

    def names(self) -> dict[str, Any]:
        """The split as ``tasks.json`` records it (with ``overlong`` where questions were left
        out)."""
        out: dict[str, Any] = {
            "meta_train": [p.name for p in self.train],
            "meta_test": [p.name for p in self.test],
            # the questions each task had (TaskPool.digest): meta-evaluate checks it reads the
            # same data, which a relative path, from another folder, may not
            "task_data": {p.name: p.digest() for p in [*self.train, *self.test]},
        }
        if self.overlong:
            out["overlong"] = self.overlong
        return out


def load_split(cfg: MetaConfig) -> MetaSplit:
    """Every task of ``cfg.tasks`` loaded (so a bad one fails before any training) and split
    into meta-train and held-out tasks by ``cfg.seed``."""
    names = collection_names(cfg.tasks)
    train, test = split_tasks(names, cfg.meta_test_tasks, cfg.seed)
    pools = {name: load_pool(name, cfg.data_root, cfg.split) for name in names}
    for pool in pools.values():
        pool.check_size(cfg.k_shot)
    return MetaSplit([pools[n] for n in train], [pools[n] for n in test])


def short_pools(pools: Sequence[TaskPool], k_shot: int, wanted: int) -> dict[str, int]:
    """Task -> questions beyond its ``k_shot`` support set, for the tasks with fewer than
    ``wanted`` (a query or evaluation size the protocol then cannot draw in full)."""
    left = {p.name: len(p.examples) - k_shot for p in pools}
    return {name: n for name, n in left.items() if n < wanted}


def check_same_data(split: MetaSplit, recorded: Any, run: Path) -> None:
    """``DataError`` naming the tasks whose questions differ from those ``run`` was trained on
    (``recorded``: its ``tasks.json``'s ``task_data``; runs from before it was recorded are
    not checked): a collection given by relative paths reads other data from another folder,
    or the data were edited since."""
    if not isinstance(recorded, dict):
        return
    now = {p.name: p.digest() for p in [*split.train, *split.test]}
    changed = sorted(name for name, digest in recorded.items() if now.get(name) != digest)
    if changed:
        raise DataError(
            f"the questions of {', '.join(changed)} differ from those {run} was meta-trained "
            "on: the data were edited, or its relative task paths (meta_config.json) found "
            "other folders from here; run from the folder meta-train ran in"
        )


def fit_split(split: MetaSplit, inputs: TaskInputsFactory, cfg: MetaConfig) -> MetaSplit:
    """``split`` with every task's questions checked against the prompt budget of ``inputs``
    before anything trains (a question is otherwise encoded only when a draw picks it, which
    could be hours into a run). A question whose options alone exceed it: with ``cfg.overlong``
    ``"error"`` a ``DataError`` naming the tasks, a question and the ``--max-length`` that fits
    them all; with ``"drop"`` the split without them (``MetaSplit.overlong`` lists them). The
    same run re-creates the same pools, so ``meta-evaluate`` draws the same support sets."""
    kept_by: dict[str, list[MCExample]] = {}
    left_out: dict[str, dict[str, int]] = {}
    pools = {pool.name: pool for pool in [*split.train, *split.test]}
    for pool in pools.values():
        with naming_the_file(pool.task, pool.split):  # a question scoring cannot read
            kept, out = fitting_examples(
                pool.task, pool.examples, inputs.tokenizer, inputs.max_length, inputs.scoring
            )
        if out:
            kept_by[pool.name], left_out[pool.name] = kept, out
    if not left_out:
        return split
    if cfg.overlong != "drop":
        n = sum(len(v) for v in left_out.values())
        counts = ", ".join(f"{name} {len(v)}" for name, v in left_out.items())
        name, ids = next(iter(left_out.items()))
        first, needed = next(iter(ids.items()))
        most = max(t for v in left_out.values() for t in v.values())
        pool = pools[name]
        where = pool.task.where(pool.split, next(e.line for e in pool.examples if e.id == first))
        raise DataError(
            f"{n} question(s) of {len(left_out)} task(s) cannot fit --max-length "
            f"{inputs.max_length} even with their passage and question cut ({counts}; e.g. "
            f"{first!r} of {name}{where} needs {needed} tokens): --max-length {most} fits them "
            "all, or --overlong drop leaves them out (listed in tasks.json)"
        )

    def fitted(pool: TaskPool) -> TaskPool:
        if pool.name not in kept_by:
            return pool
        smaller = TaskPool(pool.name, pool.task, kept_by[pool.name], pool.split)
        smaller.check_size(cfg.k_shot)  # what is left must still hold a support set
        return smaller

    return MetaSplit([fitted(p) for p in split.train], [fitted(p) for p in split.test], left_out)


def reusing_prefix(nll: Nll) -> Nll:
    """``nll`` whose forwards run the model's frozen blocks once per batch object, however
    often it is called on that batch (module doc); a model without a frozen prefix runs whole.
    Holds its batches and their block outputs while it lives: one per task and adaptation."""
    cache = BatchPrefixCache()

    def cached(model: nn.Module, batch: Batch) -> torch.Tensor:
        with cache.injected(model, batch):
            return nll(model, batch)

    return cached


@dataclass(frozen=True)
class TaskInputsFactory:
    """Turns one task's examples into batches or a dataset under the run's tokenizer,
    prompt length and scoring. ``prefix_cache``: the frozen blocks below the adapters run once
    per support / query batch of an adaptation (``nll``) and once per evaluation question
    (``meta_evaluate``), when the model has such blocks."""

    tokenizer: object
    max_length: int
    batch_size: int
    scoring: Scoring
    device: torch.device
    prefix_cache: bool = True

    def dataset(self, pool: TaskPool, examples: Sequence[MCExample]) -> EncodedDataset:
        enc = encode_split(pool.task, list(examples), self.tokenizer, self.max_length, self.scoring)
        return EncodedDataset(enc)

    def collator(self, pool: TaskPool) -> MCCollator:
        return MCCollator(self.tokenizer.pad_token_id, pool.task.n_options)  # type: ignore[attr-defined]

    def option_ids(self, pool: TaskPool) -> torch.Tensor | None:
        ids = scoring_option_ids(self.tokenizer, pool.task, self.scoring)
        return None if ids is None else ids.to(self.device)

    def batches(self, pool: TaskPool, examples: Sequence[MCExample]) -> list[Batch]:
        """``examples`` in batches of ``batch_size``, on the device."""
        data, collate = self.dataset(pool, examples), self.collator(pool)
        out = []
        for lo in range(0, len(data), self.batch_size):
            batch = collate([data[i] for i in range(lo, min(lo + self.batch_size, len(data)))])
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out

    def nll(self, pool: TaskPool) -> Nll:
        """The task's per-example answer NLL (its own answer tokens); a fresh one per call,
        reusing the frozen blocks' output of the batches it is given (``reusing_prefix``)
        under ``prefix_cache``: ask for one per task draw."""
        nll = answer_nll(self.option_ids(pool))
        return reusing_prefix(nll) if self.prefix_cache else nll


@dataclass(frozen=True)
class MetaRun:
    """A saved meta-learning run as ``meta-evaluate`` reads it: its folder, its protocol, its
    ABMLL settings (whose ``inner_steps`` / ``inner_lr`` are the adaptation budget of every
    method in the run's comparison), its task split and the inputs of its tokenizer."""

    folder: Path
    cfg: MetaConfig
    budget: AbmllConfig
    split: MetaSplit
    inputs: TaskInputsFactory
