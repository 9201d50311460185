"""Decisions every process must take together, and refusing launches that would train wrong.

Why a module of its own: the training loop and the pipeline that writes a run's summary both
need the same rule, a failure on the main process must reach every process instead of leaving
the others waiting at the next collective forever. On one process each helper is free.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from blob_lora.training import checkpoint as ckpt
from blob_lora.utils.errors import BlobLoraError, ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

T = TypeVar("T")


def check_launch(accelerator: Accelerator) -> None:
    """Refuse launches that would silently train wrong: N independent copies, or sharded
    parameters that the KL and the checkpoints do not handle."""
    from accelerate.utils import DistributedType

    try:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        launched = 1
    if launched != accelerator.num_processes:
        raise BlobLoraError(
            f"started as one of {launched} processes (WORLD_SIZE={launched}) but Accelerate runs "
            f"{accelerator.num_processes}: each would train alone into the same folder. On a "
            "machine without GPUs set ACCELERATE_USE_CPU=1 (e.g. 'ACCELERATE_USE_CPU=1 "
            "accelerate launch --multi_gpu --num_processes N -m blob_lora.cli.main train ...')"
        )
    refused = {
        DistributedType.FSDP: "FSDP",
        DistributedType.DEEPSPEED: "DeepSpeed",
        DistributedType.MEGATRON_LM: "Megatron-LM",
    }
    if accelerator.distributed_type in refused:
        raise ConfigError(
            f"{refused[accelerator.distributed_type]} is not supported: blob-lora replicates the "
            "(small) adapter on every process and computes the KL and checkpoints on all of it. "
            "Launch with plain multi-GPU/multi-CPU data parallelism (accelerate launch "
            "--multi_gpu); to save memory use --dtype bfloat16 or --load-in-4bit"
        )


def on_main(accelerator: Accelerator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process and hand its result, or its error, to every process.

    Without this a failure on the main process (a refused --out, a full disk) would leave the
    other processes waiting at the next collective forever.
    """
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    payload: list[Any] = [None]
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            payload = [("ok", fn())]
        except BlobLoraError as exc:
            error = exc
            payload = [("error", exc)]
        except Exception as exc:
            error = exc
            payload = [("error", RuntimeError(f"the main process failed: {exc!r}"))]
    broadcast_object_list(payload)
    kind, value = payload[0]
    if error is not None:
        raise error
    if kind == "error":
        raise value
    return value


def all_true(accelerator: Accelerator, flag: bool) -> bool:
    """``flag`` on every process (one tiny all-reduce; free on a single process)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item()) == 0.0


def reduce_window(
    accelerator: Accelerator, window: dict[str, float], stop: bool
) -> tuple[dict[str, float], bool]:
    """Sum the logging window over processes, and whether any process wants to stop."""
    if accelerator.num_processes == 1:
        return dict(window), stop
    keys = ("nll", "micro", "correct", "n")
    t = torch.tensor(
        [window[k] for k in keys] + [1.0 if stop else 0.0],
        dtype=torch.float64,
        device=accelerator.device,
    )
    t = accelerator.reduce(t, reduction="sum").tolist()
    return dict(zip(keys, t[:4], strict=True)), t[4] > 0


def gather_rng(accelerator: Accelerator) -> list[dict[str, Any]]:
    """Every process's random-number state, for a checkpoint that resumes each stream."""
    from accelerate.utils import gather_object

    state = ckpt.rng_state()
    if accelerator.num_processes == 1:
        return [state]
    return gather_object([state])
