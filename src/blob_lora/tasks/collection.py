"""A collection of tasks for meta-learning: which tasks, which of them are held out, and per task
the k-shot support set and the questions it is scored on.

Meta-learning (ABMLL, issue 24) trains on many tasks and is judged on tasks it never saw. A
collection is named by one string so the CLI, a config file and a saved run all say it the same
way:

* ``mmlu``: the 57 MMLU subjects, each ``mmlu:<subject>`` (from ``--data-root`` /
  ``$BLOB_LORA_DATA`` or the Hub, as every named task);
* ``paper``: the paper's six tasks (:data:`PAPER_TASKS`);
* ``a,b,c``: task names (or task folders) separated by commas;
* a folder whose sub-folders are tasks in the project's own JSONL format (README, "Your own
  data"): each sub-folder holding ``validation.jsonl`` or ``test.jsonl`` is one task.

The held-out (meta-test) tasks are drawn by a seed, and so are each task's support set and its
query / evaluation questions, so a saved run re-creates exactly the split it was trained on.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from blob_lora.tasks.examples import MCExample, examples_digest
from blob_lora.tasks.registry import MMLU_SUBJECTS, Task, get_task
from blob_lora.tasks.sources import split_candidates
from blob_lora.utils.errors import ConfigError, DataError

#: the six tasks of the BLoB paper (WinoGrande small and medium, ARC, OpenBookQA, BoolQ)
PAPER_TASKS = (
    "winogrande_s",
    "arc_challenge",
    "arc_easy",
    "winogrande_m",
    "openbookqa",
    "boolq",
)
#: the fewest tasks a collection may hold: one to meta-train on, one to hold out
MIN_TASKS = 2


def collection_names(spec: str) -> list[str]:
    """The task names (or task folders) of the collection ``spec`` (module doc), in a fixed
    order; a folder that holds no task, or a spec naming fewer than :data:`MIN_TASKS`, is
    refused naming what was looked for."""
    text = spec.strip()
    if text.lower() == "mmlu":
        names = [f"mmlu:{s}" for s in MMLU_SUBJECTS]
    elif text.lower() == "paper":
        names = list(PAPER_TASKS)
    elif "," in text:
        names = [part.strip() for part in text.split(",") if part.strip()]
    else:
        names = _folder_tasks(Path(text).expanduser())
    keys = [_identity(name) for name in names]
    if len(set(keys)) != len(keys):
        # one task under two spellings (tasks/a, ./tasks/a/) could be held out and trained on
        raise ConfigError(f"task collection {spec!r} names a task twice")
    if len(names) < MIN_TASKS:
        raise ConfigError(
            f"task collection {spec!r} holds {len(names)} task(s); meta-learning needs at least "
            f"{MIN_TASKS} (one to meta-train on, one held out)"
        )
    return names


def _identity(name: str) -> str:
    """What a collection entry refers to: a task folder's resolved path (however it was
    spelled), else the registered name as the registry reads it."""
    path = Path(name).expanduser()
    return f"path:{path.resolve()}" if path.is_dir() else f"name:{name.strip().lower()}"


def _folder_tasks(folder: Path) -> list[str]:
    """Every sub-folder of ``folder`` with an evaluation split, as a path, sorted by name."""
    if not folder.is_dir():
        raise DataError(
            f"task collection {folder} is not a folder (and not 'mmlu', 'paper' or a "
            "comma-separated list of tasks)"
        )
    names = [
        str(sub)
        for sub in sorted(folder.iterdir())
        if sub.is_dir()
        and any(p.is_file() for s in ("validation", "test") for p in split_candidates(sub, s))
    ]
    if not names:
        raise DataError(
            f"task collection {folder} holds no task: expected sub-folders with "
            "validation.jsonl or test.jsonl"
        )
    return names


def split_tasks(names: list[str], n_test: int, seed: int) -> tuple[list[str], list[str]]:
    """``(meta_train, meta_test)``: ``n_test`` of ``names`` held out, drawn by ``seed``; each
    list keeps the collection's order."""
    if not 1 <= n_test < len(names):
        raise ConfigError(
            f"--meta-test-tasks must be between 1 and {len(names) - 1} for a collection of "
            f"{len(names)} tasks, got {n_test}"
        )
    held = set(random.Random(seed).sample(names, n_test))
    return [n for n in names if n not in held], [n for n in names if n in held]


@dataclass(frozen=True)
class TaskPool:
    """One task of a collection with the questions the protocol draws from: its ``split``
    (default: the task's evaluation split, the one every kind of task has), kept so that an
    error about one of its questions found later can name the question's file."""

    name: str
    task: Task
    examples: list[MCExample]
    split: str = "eval"

    def digest(self) -> str:
        """A digest of the questions (ids, texts, options, answers): a saved run compares it
        with the data it is evaluated on, which a relative path may find elsewhere."""
        return examples_digest(self.examples, with_labels=True)[:16]

    def check_size(self, k_shot: int) -> None:
        """``DataError`` naming the task unless it has ``k_shot`` questions and one more."""
        if len(self.examples) < k_shot + 1:
            raise DataError(
                f"task {self.name!r} has {len(self.examples)} questions; the protocol needs "
                f"k-shot {k_shot} plus at least one more"
            )

    def draw(
        self, k_shot: int, rest: int | None, seed: int
    ) -> tuple[list[MCExample], list[MCExample]]:
        """``(support, others)``: ``k_shot`` questions and, disjoint from them, up to ``rest``
        more (all the others when ``None``), shuffled by ``seed``."""
        self.check_size(k_shot)
        order = list(range(len(self.examples)))
        random.Random(seed).shuffle(order)
        picked = [self.examples[i] for i in order]
        stop = None if rest is None else k_shot + rest
        return picked[:k_shot], picked[k_shot:stop]


def load_pool(
    name: str, data_root: str | os.PathLike[str] | None = None, split: str = "eval"
) -> TaskPool:
    """The task ``name`` (a registered name or a folder) and its questions of ``split``."""
    task = get_task(name, data_root)
    return TaskPool(name, task, task.load(split), split)


def task_seed(seed: int, name: str) -> int:
    """A seed for ``name`` under the protocol's ``seed`` that does not depend on the task's
    position in a list (nor on Python's per-process string hashing). A task folder's name is
    its path as the collection spells it (``tasks/a``), so another spelling of the same
    folders draws other support sets: valid draws, but not the same run. Left so because
    seeding by anything else would change the numbers of every run made before."""
    return (seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))) % (2**31)
