"""Resuming a run: its latest checkpoint loaded into the adapter, the optimisers, the method's
own state and the RNG streams, and the data position recomputed for this launch's layout.

Why apart from ``training.checkpoint``: that module reads and writes checkpoint files and knows
nothing of models or processes; this one puts a checkpoint's content back into a prepared run
(shards under FSDP, another number of processes, another batch layout).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from blob_lora.methods.base import Method
from blob_lora.training import checkpoint as ckpt
from blob_lora.training.distributed import shard_like, shard_optimizer_state, uses_fsdp
from blob_lora.training.optim import Updater
from blob_lora.training.run_dir import check_same_training_data
from blob_lora.utils.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator


def restore_checkpoint(
    root: Path,
    unwrapped: nn.Module,
    updater: Updater,
    accelerator: Accelerator,
    layout: dict[str, int],
    method: Method,
    *,
    train_data: str | None = None,
    bucketed: bool = False,
) -> tuple[int, int, int, float]:
    """Load the latest checkpoint: (step, epoch, micro-batch in epoch, training seconds so far).

    ``train_data`` (``Task.source_fingerprint`` of the training split): refused when the
    checkpoint was written on other data (``run_dir.check_same_training_data``). ``bucketed``
    (``--bucket-by-length``): refused unless the per-process batch size is the checkpoint's,
    since length buckets are formed at it.
    """
    path = ckpt.latest_checkpoint(root)
    if path is None:
        return 0, 0, 0, 0.0
    state = ckpt.load_checkpoint(path)
    if train_data is not None:
        check_same_training_data(state["state"].get("train_data"), train_data, root.parent)
    params = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    ckpt.check_fits(path, params, saved)
    loop = state["state"]
    saved_global = loop.get("global_batch")
    if saved_global is not None and int(saved_global) != layout["global_batch"]:
        raise ConfigError(
            f"cannot resume from {path}: it was trained with a global batch of {saved_global} "
            f"(batch_size {loop.get('batch_size')} x grad_accum {loop.get('grad_accum')} x "
            f"{loop.get('world_size')} processes), this launch has {layout['global_batch']} "
            f"({layout['batch_size']} x {layout['grad_accum']} x {layout['world_size']}); "
            "choose --batch-size/--grad-accum to match"
        )
    saved_micro = loop.get("batch_size")
    if bucketed and saved_micro is not None and int(saved_micro) != layout["batch_size"]:
        # length buckets are formed at the per-process batch size: another one makes other
        # batches, and the mid-epoch skip would repeat some examples and never show others
        raise ConfigError(
            f"cannot resume from {path}: --bucket-by-length batches were formed at --batch-size "
            f"{saved_micro} per process, this launch has {layout['batch_size']}; resume with "
            f"--batch-size {saved_micro} (and --grad-accum / processes to keep the global batch)"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(shard_like(value, params[name]))
    optim = state["optim"]
    saved_optims = optim.get("optimizers", [])
    if uses_fsdp(accelerator) and len(saved_optims) == len(updater.optimizers):
        # whole-tensor states, cut like the sharded parameters they belong to
        optim = {
            **optim,
            "optimizers": [
                shard_optimizer_state(o, sd)
                for o, sd in zip(updater.optimizers, saved_optims, strict=True)
            ],
        }
    updater.load_state_dict(optim)
    method.load_training_state(unwrapped, state.get("method", {}))
    rngs = state["rng"]
    rank = accelerator.process_index
    same_world = loop.get("world_size") == accelerator.num_processes
    if same_world and rank < len(rngs):
        ckpt.set_rng_state(rngs[rank])
    else:  # other world size: deterministic fresh streams
        torch.manual_seed(int(loop["step"]) * 1000 + rank)
    micro = int(loop["micro_in_epoch"])
    if "examples_in_epoch" in loop:  # position in examples: valid for any batch layout
        per_micro = layout["batch_size"] * layout["world_size"]
        examples = int(loop["examples_in_epoch"])
        if examples % per_micro:
            raise ConfigError(
                f"cannot resume from {path}: {examples} examples of the epoch were consumed, "
                f"not a whole number of batches of {per_micro}"
            )
        micro = examples // per_micro
    accelerator.print(f"resuming from {path} (step {loop['step']})", file=sys.stderr)
    seconds = float(loop.get("train_seconds", 0.0))
    return int(loop["step"]), int(loop["epoch"]), micro, seconds
