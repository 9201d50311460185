"""The folder a task's results are written to, and refusing two tasks that would share one.

Why in ``tasks``: the training floor checks ``--eval-tasks`` before its first step, and
evaluation, ``compare`` and the CLI name their folders the same way; all of them sit above.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from blob_lora.utils.errors import ConfigError

#: the longest folder name (bytes) kept as it is: what file systems take, and so what earlier
#: runs could write
NAME_LIMIT = 255
#: the longest name (bytes) of a file named after a task and written atomically (a claim's
#: lock, a reliability plot): its temporary ``.<name>.XXXXXXXX.tmp`` must fit the 255
FILE_LIMIT = 200
#: the length (bytes) a longer name is shortened to: its end and a digest of the whole name
SHORT_NAME = 128


def task_dir_name(name: str) -> str:
    """A task name as a folder name: ``mmlu:college_physics`` -> ``mmlu__college_physics``, a
    task folder's path -> its parts joined by ``_`` (``data/mine`` -> ``data_mine``); a path
    that starts with a dot is written plainly first (``./mine`` -> ``mine``; ``.`` -> the
    folder's own name), so that no task lands in the evaluation folder itself or in a hidden
    one. Two tasks may still share a name (``x/y`` and ``x_y``): :func:`check_distinct_dirs`
    refuses such a list. A name too long for a folder (over :data:`NAME_LIMIT` bytes: a deep
    task folder's whole path) is shortened by :func:`fit_name`; shorter names, which earlier
    runs wrote, stay as they were."""
    if name.startswith("."):
        plain = os.path.normpath(name)
        if plain.split(os.sep)[-1] in (".", ".."):
            plain = Path(name).resolve().name or "task"
        name = plain.lstrip("./") or "task"
    return fit_name(name.replace(":", "__").replace("/", "_"))


def fit_name(name: str, limit: int = NAME_LIMIT) -> str:
    """``name`` as it is up to ``limit`` bytes; a longer one as 12 hex digits of its digest
    and its end, :data:`SHORT_NAME` bytes at most (the end is the most specific part of a
    path; the digest keeps two names apart that differ only before it)."""
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    tail = name
    while len(tail.encode()) > SHORT_NAME - len(digest) - 1:
        tail = tail[1:]  # by characters, so a multi-byte one is never cut in half
    return f"{digest}-{tail.lstrip('_')}"


def check_distinct_dirs(names: Sequence[str], what: str) -> None:
    """Refuse tasks whose results would share one folder (:func:`task_dir_name`): the second
    would overwrite the first, or be taken for it."""
    seen: dict[str, str] = {}
    for name in names:
        folder = task_dir_name(name)
        if folder in seen and seen[folder] != name:
            raise ConfigError(
                f"{what}: tasks {seen[folder]!r} and {name!r} would write their results to the "
                f"same folder {folder!r}; rename or move one of the task folders"
            )
        seen[folder] = name
