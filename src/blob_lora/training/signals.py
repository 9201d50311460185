"""Stopping a training loop cleanly on SIGINT / SIGTERM: the signal is recorded, not raised,
so the loop finishes its step, writes a checkpoint and stops with :class:`TrainingInterrupted`;
the same command with ``--resume`` then continues from that step.

Why one module: ``train``'s loop (``training.loop``) and the meta-learning outer loop
(``pipeline.meta_loop``) stop the same way, and a job scheduler's SIGTERM (a session's end, a
pre-empted node) should cost neither of them more than the step in flight.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from typing import Any

from blob_lora.utils.errors import BlobLoraError


class TrainingInterrupted(BlobLoraError):
    """SIGINT/SIGTERM arrived; a checkpoint was written first."""


@dataclass
class StopSignals:
    """SIGINT/SIGTERM recorded, not raised, so every process stops at the same step boundary
    after a checkpoint; a SIGINT after the first signal (Ctrl-C again) stops at once. Outside
    the main thread no handler can be installed and signals keep their default effect.

    Another SIGTERM only asks again for what is coming: schedulers escalate with SIGKILL, not a
    second SIGTERM, and ``pkill -f`` matching ``compare --workers`` and its workers reaches a
    worker twice (directly, then forwarded by the command once its own step is done), which
    must not cost the worker its checkpoint.
    """

    received: int | None = None

    def __enter__(self) -> StopSignals:
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.received is not None:
            if signum == signal.SIGTERM:
                return  # the stop already asked for is coming (see the class docstring)
            raise KeyboardInterrupt  # Ctrl-C again: give up at once
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
