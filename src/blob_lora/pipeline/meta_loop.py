"""The outer loop of meta-training, shared by ``meta_train`` and the multi-task LoRA baseline
(``meta_multitask``): AdamW steps from a resumable position, the per-step log, checkpoints.

Checkpoints are ``train``'s own (``training/checkpoint.py``: safetensors and JSON, a SHA-256
manifest written last, the folder renamed into place; nothing is ever unpickled), in
``<folder>/checkpoints/step-XXXXXXXX``. One holds the trainable tensors, AdamW's state, the
RNG states (LoRA dropout draws from the global RNG) and, in ``state.json``, the step, the run's
settings, the log so far and the wall seconds so far (``seconds``: every sitting, each counted
to its last checkpoint; what a kill cuts off after that is not counted, nor done). Every other
draw of a step is a function of the seed and the step (``meta_train.draw_tasks``,
``meta_loss``'s per-step generator), and nothing else carries over from one step to the next,
so a loop restored from step k takes exactly the steps k + 1, ... of the uninterrupted run: the
finished run is the same, bit for bit, but for its wall time.

A checkpoint is written every ``checkpoint_every`` steps and once at the end, before the caller
writes its results from it: a kill while those are written leaves the final checkpoint to
finish from. A loop that does not resume claims ``checkpoints/`` at its first write: what
another run left there moves to ``checkpoints-replaced/`` (the one run replaced last), which
the caller deletes with ``discard_checkpoints`` once its own results are complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from blob_lora.training import checkpoint as ckpt
from blob_lora.training.signals import StopSignals, TrainingInterrupted
from blob_lora.utils.atomic import atomic_remove
from blob_lora.utils.errors import CheckpointError, ConfigError
from blob_lora.utils.settings import flag

#: where the checkpoints of a run that a new one replaces wait until the new one has finished
REPLACED = "checkpoints-replaced"
#: meta-steps between checkpoints of ``meta-train``. A meta-step adapts ``meta_batch_tasks``
#: task posteriors by ``inner_steps`` (10) forward and backward passes each, plus the query's:
#: ~20 passes of the model, measured on SmolLM2-135M (MMLU, cloze, q/v of the top 8 blocks,
#: one CPU thread) at ~55 CPU-seconds with the frozen-prefix reuse (~80 without; not timed on
#: a GPU). A checkpoint is ~3x the global parameters (theirs and AdamW's two moments: ~20 MB
#: for SmolLM2-135M's default shapes), measured at ~0.07 s to write here. Every 10 steps
#: costs < 1% even at a second a step, and a kill loses at most 9 steps (minutes on a CPU,
#: where every 50 could lose half an hour)
DEFAULT_CHECKPOINT_EVERY = 10

#: ``step_fn(step) -> log row``: one outer step (0-based) taken, its loss and parts
StepFn = Callable[[int], dict[str, float]]


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint of an outer loop, loaded: where, its step, the settings of the
    run that wrote it, and everything ``training/checkpoint.load_checkpoint`` read."""

    path: Path
    step: int
    settings: dict[str, Any]
    state: dict[str, Any]


def check_checkpoint_every(value: Any) -> int:
    """``value`` as the number of steps between checkpoints; ``ConfigError`` naming the
    option unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"--checkpoint-every must be an integer >= 0 (0: none), got {value!r}")
    return value


def plain_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as ``state.json`` gives them back (lists for tuples, ...), so that the
    settings a checkpoint records compare equal to those of the command that wrote it."""
    return json.loads(json.dumps(settings))


def has_checkpoints(root: Path) -> bool:
    """Whether ``root`` holds any checkpoint, intact or not."""
    return root.is_dir() and (
        (root / ckpt.LATEST).exists() or any(p.is_dir() for p in root.glob("step-*"))
    )


def newest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest intact checkpoint under ``root``, loaded; ``None`` when there is none.
    A damaged newer one is skipped with a warning; ``CheckpointError`` when none is intact."""
    path = ckpt.latest_checkpoint(root)
    if path is None:
        return None
    state = ckpt.load_checkpoint(path)
    loop = state["state"]
    settings, log = loop.get("settings"), loop.get("log")
    if not isinstance(settings, dict) or not isinstance(log, list):
        raise CheckpointError(
            f"checkpoint {path} holds no outer-loop settings and log: not written by "
            "meta-train (a checkpoint of 'blob-lora train'?)"
        )
    return Checkpoint(path, int(loop["step"]), settings, state)


def settings_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two runs' settings, each as ``--option (old -> new)``."""
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return [f"{flag(k)} ({saved.get(k)!r} -> {current.get(k)!r})" for k in keys]


def outer_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The outer loop's optimiser: AdamW without weight decay over the trainable parameters
    (ABMLL's global parameters, or the multi-task LoRA), one definition for both so that the
    baseline is trained exactly as the method it is compared with."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


class OuterLoop:
    """AdamW steps over ``model``'s trainable parameters from step 0, or from ``resume``,
    to ``total_steps``, with the log and the checkpoints of the module doc.

    ``root`` is the checkpoints folder (``None``: no checkpoint is written); ``settings`` are
    recorded in every checkpoint, so a later run resumes only from a checkpoint of its own
    settings.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        root: Path | None,
        settings: dict[str, Any],
        checkpoint_every: int,
        resume: Checkpoint | None = None,
        desc: str = "meta-train",
        progress: bool = True,
    ) -> None:
        self.model, self.optimizer, self.total_steps = model, optimizer, total_steps
        self.root, self.settings = root, plain_settings(settings)
        self.every = check_checkpoint_every(checkpoint_every)
        self.desc, self.progress = desc, progress
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.step, self.saved_step = 0, -1
        self.log: list[dict[str, Any]] = []
        #: wall seconds of the earlier sittings (from the checkpoint resumed) and this one's start
        self.seconds_before, self._started = 0.0, time.perf_counter()
        self.claimed = resume is not None  # resuming: the checkpoints are this run's
        self._rng: dict[str, Any] | None = None
        if resume is not None:
            self._restore(resume)

    def _restore(self, found: Checkpoint) -> None:
        saved = found.state["trainable"]
        ckpt.check_fits(found.path, self.trainable, saved)
        with torch.no_grad():
            for name, value in saved.items():
                self.trainable[name].copy_(value)
        self.optimizer.load_state_dict(found.state["optim"])
        self.step = self.saved_step = found.step
        self.log = list(found.state["state"]["log"])
        self.seconds_before = float(found.state["state"].get("seconds", 0.0))
        self._rng = found.state["rng"][0]  # set when the steps start: nothing may draw before
        print(
            f"resuming from {found.path} (step {found.step} of {self.total_steps})",
            file=sys.stderr,
        )

    def run(self, step_fn: StepFn) -> list[dict[str, Any]]:
        """Take the remaining steps (``step_fn`` per step), checkpointing as set, then write
        the final checkpoint; returns the whole log, ``{"step": 1, ...}`` onwards."""
        if self._rng is not None:
            ckpt.set_rng_state(self._rng)
            self._rng = None
        self._started = time.perf_counter()
        # SIGINT / SIGTERM end the step in flight, checkpoint it and stop (as train does);
        # without a checkpoints folder there is nothing to save, and the signals act as usual
        signals = StopSignals() if self.root is not None else nullcontext(None)
        with (
            signals as stop,
            tqdm(
                total=self.total_steps,
                initial=self.step,
                desc=self.desc,
                disable=not self.progress,
            ) as bar,
        ):
            while self.step < self.total_steps:
                row = step_fn(self.step)
                self.step += 1
                self.log.append({"step": self.step, **row})
                bar.update(1)
                if stop is not None and stop.received is not None:
                    self.save()
                    raise TrainingInterrupted(
                        f"{self.desc} stopped by signal {stop.received} after step "
                        f"{self.step}; checkpoint saved in {self.root}, continue with --resume"
                    )
                if self.every and self.step % self.every == 0 and self.step < self.total_steps:
                    self.save()
        if self.saved_step != self.step:
            self.save()
        return self.log

    @property
    def seconds(self) -> float:
        """Wall seconds of the steps of every sitting so far (see the module doc): what the
        run cost, where one sitting's time would say only what its last sitting cost."""
        return self.seconds_before + time.perf_counter() - self._started

    def save(self) -> None:
        """Checkpoint the current step (claiming ``root`` first; see the module doc)."""
        if self.root is None:
            return
        self._claim()
        ckpt.save_checkpoint(
            self.root,
            self.step,
            self.trainable,
            self.optimizer.state_dict(),
            [ckpt.rng_state()],
            {"settings": self.settings, "log": self.log, "seconds": self.seconds},
        )
        self.saved_step = self.step

    def _claim(self) -> None:
        assert self.root is not None
        if self.claimed:
            return
        if self.root.exists():  # another run's: kept aside until this one has finished
            replaced = self.root.parent / REPLACED
            atomic_remove(replaced)
            os.replace(self.root, replaced)
        self.claimed = True

    def discard_checkpoints(self) -> None:
        """Delete the checkpoints and the replaced run's: the caller's results are complete."""
        if self.root is not None:
            atomic_remove(self.root)
            atomic_remove(self.root.parent / REPLACED)
