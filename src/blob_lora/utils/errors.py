"""The tool's own exception types, so the CLI can print them without a traceback."""

from __future__ import annotations

from functools import partial
from typing import Any


class BlobLoraError(Exception):
    """Base class for errors caused by user input or environment, shown to users as-is."""


class DataError(BlobLoraError, ValueError):
    """A dataset file or record is missing or malformed."""


class ExampleError(DataError):
    """A question that was read but cannot be prompted or scored, found once its split is
    tokenised: long after the file was read, so the error carries the question's ``line`` in
    its file (``None`` for questions not read from a file) for the caller that knows the file
    to name both (``tasks.dataset.naming_the_file``)."""

    def __init__(self, message: str, *, example_id: str, line: int | None = None) -> None:
        super().__init__(message)
        self.example_id = example_id
        self.line = line

    def _fields(self) -> dict[str, Any]:
        return {"example_id": self.example_id, "line": self.line}

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable with its keyword-only fields: an error of the main process is sent to the
        # others (``training.distributed.on_main``), where the default rebuild fails
        return (partial(type(self), **self._fields()), self.args)


class OverlongError(ExampleError):
    """A question that cannot fit the prompt budget even with its passage and question cut:
    what is left (options, cues) needs ``needed`` tokens. A ``DataError`` like any other bad
    record; its own type so that a caller that may leave such questions out (a task collection,
    ``--overlong drop``) can tell it from a malformed one."""

    def __init__(
        self, message: str, *, example_id: str, needed: int, line: int | None = None
    ) -> None:
        super().__init__(message, example_id=example_id, line=line)
        self.needed = needed

    def _fields(self) -> dict[str, Any]:
        return {**super()._fields(), "needed": self.needed}


class ConfigError(BlobLoraError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class CheckpointError(BlobLoraError):
    """A checkpoint or adapter folder is missing, corrupt or does not fit the model."""


class DamagedFileError(CheckpointError):
    """A file of a saved run is missing, unreadable or damaged in itself: no other base model
    would load it, so the hint to name the model the run was trained on is not given."""
