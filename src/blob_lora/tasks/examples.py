"""The one record type every task is converted to: a multiple-choice question.

Every source schema (ARC's nested choices, WinoGrande's option1/option2, BoolQ's boolean
answer, MMLU's A-D columns, a user's JSONL) becomes an ``MCExample`` so prompts, scoring and
batching are written once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

MIN_OPTIONS = 2
MAX_OPTIONS = 26  # one letter A-Z per option


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question.

    ``choices`` are the option texts in source order; ``label`` is the 0-based index of the
    correct one. ``context`` is an optional passage shown before the question (BoolQ's
    passage, or a user's ``context`` field); it is the first thing truncation shortens.
    ``line`` is the question's line in the JSONL file it was read from (``None`` otherwise):
    a prompt too long to fit is found when the split is tokenised, and its error names the
    line. It is where the question was, not what it is: equality and hashing ignore it.
    """

    id: str
    question: str
    choices: tuple[str, ...]
    label: int
    context: str | None = None
    line: int | None = field(default=None, compare=False, repr=False)

    @property
    def n_options(self) -> int:
        return len(self.choices)


def examples_digest(examples: Iterable[MCExample], *, with_labels: bool) -> str:
    """sha256 over the questions' ids, texts, options and passages (and answers when
    ``with_labels``): what a set of questions held in memory, not in a file, is told apart by."""
    h = hashlib.sha256()
    for ex in examples:
        fields = [ex.id, ex.question, ex.choices, ex.context]
        h.update(json.dumps([*fields, ex.label] if with_labels else fields).encode())
    return h.hexdigest()
