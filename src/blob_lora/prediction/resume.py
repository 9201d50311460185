"""A long prediction pass that survives being stopped: what it has scored is kept on disk.

Scoring a split with N weight samples is the longest step of many runs (BoolQ's 2,270
questions with N = 10 take over an hour on two CPU cores), and a pass that is stopped (a
session's end, a SIGTERM, a crash) used to start again from its first question. A
:class:`PassCheckpoint` holds the per-example results of the batches scored so far and the
random state after the last of them, written atomically every ``every_seconds``; the next pass
with the same key skips those batches, restores the random state and goes on. Because the
samples are drawn from the global generator in batch order, the resumed pass gives exactly
the predictive the uninterrupted pass would have given (tested).

The key names everything that decides the results: the model's weights (a fingerprint of
every tensor of its state), the method, the samples, the predictive mode, the batches and the
data. A checkpoint with another key, or one that cannot be read, is ignored (with a warning
for the unreadable one): it only ever saves time, never decides a result.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blob_lora.training.checkpoint import rng_state, set_rng_state
from blob_lora.utils.atomic import atomic_write_bytes
from blob_lora.utils.fingerprint import model_fingerprint


def settings_key(settings: dict[str, Any], prefix: str = "") -> str:
    """A digest of ``prefix`` and the JSON of ``settings`` (keys sorted): the key of saved
    progress that is valid only under those settings."""
    text = json.dumps(settings, sort_keys=True, default=repr)
    return hashlib.sha256(f"{prefix}:{text}".encode()).hexdigest()


def pass_key(model: nn.Module, settings: dict[str, Any]) -> str:
    """The key of a pass: ``model``'s fingerprint and the JSON of ``settings`` (the method,
    samples, mode, batches, data digest ... whatever decides the results)."""
    return settings_key(settings, model_fingerprint(model))


@dataclass
class PassProgress:
    """What a stopped pass had scored: ``batches`` done, per-example ``columns`` (each one
    tensor, the batches concatenated), the per-sample probabilities (``None`` when the batches
    drew different numbers of samples) and the random state after the last batch."""

    batches: int
    columns: dict[str, Tensor]
    samples: Tensor | None
    rng: dict[str, Any]

    def restore_rng(self) -> None:
        set_rng_state(self.rng)


class PassCheckpoint:
    """The progress file of one prediction pass (see the module's docstring).

    ``every_seconds`` spaces the writes (0: after every batch); the caller removes the file
    with :meth:`clear` once the pass's results are safely stored elsewhere.

    Each write also records the wall seconds of the work it covers: those the loaded progress
    had recorded (``seconds_before``, set by :meth:`load`) and this sitting's since the object
    was made. A caller that makes it before work of its own that is redone after a stop (an
    adaptation before the pass) has that counted too; what a stop cuts off after the last write
    is not counted, as it is not kept.
    """

    def __init__(self, path: str | Path, key: str, *, every_seconds: float = 30.0) -> None:
        self.path = Path(path)
        self.key = key
        self.every_seconds = every_seconds
        self._last = self._opened = time.monotonic()
        self.seconds_before = 0.0

    def load(self) -> PassProgress | None:
        """The saved progress if the file exists, is readable and has this pass's key."""
        if not self.path.is_file():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            if blob.get("key") != self.key:
                return None
            progress = PassProgress(
                batches=int(blob["batches"]),
                columns=dict(blob["columns"]),
                samples=blob["samples"],
                rng=dict(blob["rng"]),
            )
            seconds = float(blob.get("seconds", 0.0))  # absent in files written before
        except Exception as exc:  # noqa: BLE001 - a damaged file is ignored, never trusted
            warnings.warn(
                f"ignoring unreadable evaluation progress {self.path}: {exc}", stacklevel=2
            )
            return None
        self.seconds_before = seconds
        return progress

    @property
    def seconds(self) -> float:
        """Wall seconds of the work this progress covers, every sitting so far: the loaded
        ``seconds_before`` and this sitting's since the object was made."""
        return self.seconds_before + time.monotonic() - self._opened

    def due(self) -> bool:
        """Whether ``every_seconds`` have passed since the last write (or the start)."""
        return time.monotonic() - self._last >= self.every_seconds

    def save(
        self, batches: int, parts: dict[str, list[Tensor]], samples: list[Tensor] | None
    ) -> None:
        """Write the progress after ``batches`` batches, with the random state of now."""
        blob = {
            "key": self.key,
            "batches": batches,
            "columns": {k: torch.cat(v) for k, v in parts.items() if v},
            "samples": torch.cat(samples) if samples else None,
            "rng": rng_state(),  # torch, CUDA, NumPy, Python: as training checkpoints keep
            "seconds": self.seconds,
        }
        buf = io.BytesIO()
        torch.save(blob, buf)
        atomic_write_bytes(self.path, buf.getvalue())
        self._last = time.monotonic()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
