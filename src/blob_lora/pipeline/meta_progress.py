"""The held-out tasks a stopped ``meta-evaluate`` had already scored, kept on disk.

A meta-evaluation adapts to and scores every held-out task in turn, and one task can take long
(MMLU subjects of 200 questions with 10 weight samples: 5-50 minutes each on two CPU cores, and
``multitask-lora`` / ``blob-support`` fit per task too). A stop (a session's end, a SIGTERM, a
crash) used to lose every task scored so far. :class:`ScoredTasks` writes each task's metrics
next to the result file as soon as the task is scored (``meta_eval.partial.json`` beside
``meta_eval.json``, ``meta_eval_<baseline>.partial.json`` beside a baseline's), atomically; the
next evaluation with the same key takes them and scores only the others.

Why this gives the uninterrupted result: every task is scored from its own seed
(``task_seed(run seed, task name)`` seeds its support draw, its adaptation and its predictive),
and a contender starts every task from the same state (ABMLL's global parameters, the reset
adapters of the baselines), so a task's metrics do not depend on which tasks were scored before
it in the same process (tested, ``tests/pipeline/test_meta_progress.py``).

The key names what decides a task's metrics: the run's protocol (``meta_config.json``), for
ABMLL its adapter folder's bytes (the global parameters and the adaptation budget) and for a
baseline the adaptation budget alone (a baseline never reads the global parameters, so a run
published without its weights and restored elsewhere keeps its baselines' progress), the base
model's weights (a fingerprint), the contender, its weight samples and the prefix cache (which
changes float rounding). Scored tasks under another key, or a file that cannot be read, are not used
(a warning says so) and are replaced as the new evaluation goes: the file only ever saves time,
never decides a result. The finished evaluation writes its result file, then removes this one.

Inside a task, its scoring pass writes its own progress every 30 s
(:meth:`ScoredTasks.pass_checkpoint`: ``prediction.resume.PassCheckpoint``, the batches scored
and the random state after them, beside the progress file), so a stop in a long task (an MMLU
subject of long questions: 18 minutes) loses at most those seconds: the next evaluation adapts
again (seeded, the same posterior) and goes on from the batch after the last one kept.

Each task's wall seconds (its adaptation and scoring, every sitting counted to its last
progress write) are kept with its metrics and end in the result file as ``task_seconds``: the
cost of an evaluation made in several sittings, which the time of its last sitting alone would
understate.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from blob_lora.prediction.resume import PassCheckpoint
from blob_lora.utils.atomic import atomic_remove, atomic_write_json
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.json_file import read_json_object

logger = logging.getLogger(__name__)

#: what the progress file's name puts in place of the result file's ``.json``
PARTIAL_SUFFIX = ".partial.json"
#: how often the task being scored writes its pass's progress (as ``evaluate`` does)
PASS_EVERY_SECONDS = 30.0


def partial_path(result: Path) -> Path:
    """The progress file of result file ``result`` (``meta_eval.json`` ->
    ``meta_eval.partial.json``)."""
    return result.with_name(result.name.removesuffix(".json") + PARTIAL_SUFFIX)


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file of ``folder`` (names and bytes, in name order): an adapter
    folder is a few MB, and a re-trained run differs in every byte."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder).as_posix()}\0".encode())
        with path.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


class ScoredTasks:
    """The metrics of the held-out tasks scored so far by the evaluation of key ``key``,
    stored in ``path`` (see the module doc). ``tasks`` holds what :meth:`load` found and
    :meth:`add` added since, by task name."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self.tasks: dict[str, dict[str, float]] = {}
        self.seconds: dict[str, float] = {}

    def load(self) -> dict[str, dict[str, float]]:
        """The tasks a stopped evaluation of this key scored (none when there is no file, it
        cannot be read, or it holds another key; a warning names the last two)."""
        if not self.path.exists():
            return {}
        try:
            saved = read_json_object(self.path, ConfigError)
            tasks, seconds = saved.get("tasks"), saved.get("seconds")
            if not isinstance(tasks, dict) or not all(isinstance(m, dict) for m in tasks.values()):
                raise ConfigError(f"{self.path} holds no per-task metrics")
            if not isinstance(seconds, dict) or set(seconds) != set(tasks):
                raise ConfigError(f"{self.path} holds no seconds for its tasks")
        except ConfigError as exc:
            logger.warning("scoring every held-out task again: %s", exc)
            return {}
        if saved.get("key") != self.key:
            logger.warning(
                "scoring every held-out task again: %s was written by an evaluation under "
                "other settings (run, adapter, base model, contender or samples)",
                self.path,
            )
            return {}
        self.tasks, self.seconds = dict(tasks), dict(seconds)
        return self.tasks

    def add(self, name: str, metrics: dict[str, float], seconds: float) -> None:
        """Record task ``name``'s metrics and the wall seconds its adaptation and scoring took,
        on disk before this returns."""
        self.tasks[name] = metrics
        self.seconds[name] = seconds
        atomic_write_json(
            self.path, {"key": self.key, "tasks": self.tasks, "seconds": self.seconds}
        )

    def pass_checkpoint(self, name: str) -> PassCheckpoint:
        """The progress of task ``name``'s scoring pass, beside the progress file (one file
        per task, named by a digest of the task's name: a folder task's name is a path),
        keyed by this evaluation's key and the task."""
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        stem = self.path.name.removesuffix(".json")
        return PassCheckpoint(
            self.path.with_name(f"{stem}.task-{digest}.pt"),
            f"{self.key}:{name}",
            every_seconds=PASS_EVERY_SECONDS,
        )

    def clear(self) -> None:
        """Remove the progress file (its tasks are in the result file now)."""
        atomic_remove(self.path)
