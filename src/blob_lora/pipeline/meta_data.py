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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blob_lora.methods.abmll import answer_nll
from blob_lora.models.prefix_cache import BatchPrefixCache
from blob_lora.pipeline.meta_config import MetaConfig
from blob_lora.tasks.collection import TaskPool, collection_names, load_pool, split_tasks
from blob_lora.tasks.dataset import EncodedDataset, MCCollator, encode_split
from blob_lora.tasks.examples import MCExample
from blob_lora.tasks.scoring import Scoring, scoring_option_ids
from blob_lora.tuners.abmll import AbmllConfig
from blob_lora.tuners.abmll.meta import Batch, Nll


@dataclass(frozen=True)
class MetaSplit:
    """The collection's tasks, loaded, by role."""

    train: list[TaskPool]
    test: list[TaskPool]

    def names(self) -> dict[str, list[str]]:
        return {
            "meta_train": [p.name for p in self.train],
            "meta_test": [p.name for p in self.test],
        }


def load_split(cfg: MetaConfig) -> MetaSplit:
    """Every task of ``cfg.tasks`` loaded (so a bad one fails before any training) and split
    into meta-train and held-out tasks by ``cfg.seed``."""
    names = collection_names(cfg.tasks)
    train, test = split_tasks(names, cfg.meta_test_tasks, cfg.seed)
    pools = {name: load_pool(name, cfg.data_root, cfg.split) for name in names}
    for pool in pools.values():
        pool.check_size(cfg.k_shot)
    return MetaSplit([pools[n] for n in train], [pools[n] for n in test])


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
