"""Questions to predict on: bring-your-own JSONL records whose ``answer`` may be missing.

The record schema is the one of a BYO task folder (``question``, ``choices``, optional
``context`` and ``id``), parsed by the task layer's own ``parse_generic`` so prompts and
checks are identical to training; only ``answer`` becomes optional. The result is an
in-memory ``Task`` (its source holds the examples) plus the labels that were given.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from blob_lora.tasks import MCExample, Task
from blob_lora.tasks.examples import examples_digest
from blob_lora.tasks.prompts import STYLE_MC
from blob_lora.tasks.sources import (
    LETTERS,
    LabelOptional,
    decode_jsonl,
    parse_rows,
    read_jsonl_examples,
)
from blob_lora.tasks.splits import SplitSpec
from blob_lora.utils.errors import DataError

INPUT_SPLIT = "input"


@dataclass
class Questions:
    """Parsed questions: ``task`` (letters A.. up to the largest option count), ``examples``
    in input order, and ``labels[i]`` (the given answer's index, or ``None``)."""

    task: Task
    examples: list[MCExample]
    labels: list[int | None]


class InMemorySource:
    """A task source whose only split (``input``) is a list of examples held in memory;
    ``where`` names the file (or ``<stdin>``) they were read from, if any."""

    def __init__(self, examples: list[MCExample], where: str | None = None) -> None:
        self.examples = list(examples)
        self.where = where
        self._digest = examples_digest(self.examples, with_labels=False)

    def read(self, spec: SplitSpec) -> list[MCExample]:
        if spec.name != INPUT_SPLIT:
            raise DataError(f"in-memory questions have only the split {INPUT_SPLIT!r}")
        return list(self.examples)

    def fingerprint(self, spec: SplitSpec) -> str:
        return f"memory:{self._digest}"

    def location(self, split: str) -> str | None:
        """The file the questions came from, for errors found when they are tokenised."""
        return self.where


def questions_task(
    examples: list[MCExample], name: str = "predict", where: str | None = None
) -> Task:
    """A multiple-choice ``Task`` over ``examples`` (letters A.. for the largest option count);
    ``where``: the file they were read from, named by errors found later."""
    if not examples:
        raise DataError("no questions to predict")
    n = max(ex.n_options for ex in examples)
    source = InMemorySource(examples, where)
    return Task(name, n, LETTERS[:n], None, INPUT_SPLIT, STYLE_MC, source)


def parse_questions(
    questions: Iterable[dict[str, Any] | MCExample], where: str = "questions"
) -> Questions:
    """Records (dicts in the BYO schema, or ``MCExample``) to :class:`Questions`.

    Records without an ``id`` get their 1-based position; errors name that position.
    """
    if isinstance(questions, str | bytes | Mapping):
        kind = "one record (a dict)" if isinstance(questions, Mapping) else "a string"
        raise DataError(f"{where}: expected a list of records, got {kind}; wrap it in a list")
    items = list(questions)
    if all(isinstance(q, MCExample) for q in items):
        return Questions(questions_task(items), items, [ex.label for ex in items])
    if any(isinstance(q, MCExample) for q in items):
        raise DataError(f"{where}: mix of MCExample objects and records; pass one kind")
    parser = LabelOptional()
    examples = parse_rows(enumerate(items, 1), parser, where, "", "record")
    labels = [ex.label if has else None for ex, has in zip(examples, parser.labelled, strict=True)]
    return Questions(questions_task(examples), examples, labels)


#: the ``--input`` that reads standard input (``jq ... | blob-lora predict --input - ...``)
STDIN = "-"


def read_questions(path: str | os.PathLike[str], stdin: BinaryIO | None = None) -> Questions:
    """Questions from a JSONL file (``.jsonl`` or ``.jsonl.gz``), or from standard input when
    ``path`` is ``"-"`` (``stdin``: the stream to read instead of ``sys.stdin``); records
    without ``id`` are named by line number, and every error names the file and line."""
    parser = LabelOptional()
    if str(path) == STDIN:
        where, name = "<stdin>", "stdin"
        stream = stdin if stdin is not None else sys.stdin.buffer
        examples = parse_rows(decode_jsonl(stream, where), parser, where, "line-", "line")
    else:
        path = Path(path)
        if path.is_dir():
            raise DataError(f"input {path} is a folder; give a JSONL file (.jsonl or .jsonl.gz)")
        if not path.is_file():
            raise DataError(f"input file {path} not found")
        where, name = str(path), path.stem
        examples = read_jsonl_examples(path, parser, "line-")
    if not examples:
        raise DataError(f"{where} holds no questions")
    labels = [ex.label if has else None for ex, has in zip(examples, parser.labelled, strict=True)]
    return Questions(questions_task(examples, name=name, where=where), examples, labels)
