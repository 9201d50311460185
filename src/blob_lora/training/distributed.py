"""Decisions every process must take together, and refusing launches that would train wrong.

Why a module of its own: the training loop and the pipeline that writes a run's summary both
need the same rule, a failure on the main process must reach every process instead of leaving
the others waiting at the next collective forever. On one process each helper is free.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from blob_lora.training import checkpoint as ckpt
from blob_lora.utils.errors import BlobLoraError, ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState

T = TypeVar("T")


def uses_fsdp(accelerator: Accelerator) -> bool:
    """Whether Accelerate shards the model with FSDP2 (``fully_shard``: DTensor parameters)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def effective_precision(requested: str, native_amp: bool) -> str:
    """The mixed precision a run actually trains in: Accelerate's ``requested`` setting, or
    ``"no"`` where it has no autocast for it (``native_amp`` false: fp16 on a CPU, which
    Accelerate accepts and then runs in float32, measured step for step)."""
    return requested if requested != "no" and native_amp else "no"


def warn_ineffective_precision(accelerator: Accelerator) -> str:
    """Warn when the launch's mixed precision does not take effect; return the effective one
    (what ``summary.json`` records as ``mixed_precision``)."""
    requested = str(accelerator.mixed_precision)
    effective = effective_precision(requested, bool(getattr(accelerator, "native_amp", False)))
    if effective != requested:
        warnings.warn(
            f"mixed precision {requested} has no effect on {accelerator.device.type}: "
            "Accelerate trains in float32 there (on a CPU, bf16 does take effect)",
            UserWarning,
            stacklevel=2,
        )
    return effective


def _launched_for_fsdp() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch --use_fsdp`` sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_requested() -> bool:
    """Whether this process was launched for FSDP (``accelerate launch --use_fsdp``), or an
    Accelerator of this process already runs it; readable before any Accelerator exists."""
    if _launched_for_fsdp():
        return True
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    return bool(state) and state.get("distributed_type") == DistributedType.FSDP


def process_state() -> PartialState:
    """Accelerate's process state for work done before (or without) an ``Accelerator``: which
    process is the main one. ``PartialState()`` alone ignores ``ACCELERATE_USE_CPU``, which
    ``Accelerator`` honours: on the documented CPU launch (``ACCELERATE_USE_CPU=1 accelerate
    launch --multi_gpu``) every process would take itself for the only one, and all of them
    would claim the run folder. The state is shared: the first call decides, so this one reads
    the flag as the Accelerator will."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when unset or unreadable)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process's rank as the launcher set it (``RANK``; 0 when unset or unreadable): for
    a line printed before any ``Accelerator`` exists, once per launch."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def check_launch(accelerator: Accelerator) -> None:
    """Refuse launches that would silently train wrong: N independent copies, FSDP asked for but
    not run, or sharding that the KL and the checkpoints do not handle (FSDP1, DeepSpeed)."""
    from accelerate.utils import DistributedType

    launched = launched_processes()
    if launched != accelerator.num_processes:
        raise BlobLoraError(
            f"started as one of {launched} processes (WORLD_SIZE={launched}) but Accelerate runs "
            f"{accelerator.num_processes}: each would train alone into the same folder. On a "
            "machine without GPUs set ACCELERATE_USE_CPU=1 (e.g. 'ACCELERATE_USE_CPU=1 "
            "accelerate launch --multi_gpu --num_processes N -m blob_lora.cli.main train ...')"
        )
    kind = accelerator.distributed_type
    if _launched_for_fsdp() and kind != DistributedType.FSDP:
        raise ConfigError(
            f"FSDP was asked for (accelerate launch --use_fsdp) but Accelerate runs "
            f"{getattr(kind, 'value', kind)}: Accelerate shards with FSDP on GPUs only, and with "
            "ACCELERATE_USE_CPU=1 it would silently fall back to replicating the whole model. "
            "On CPUs launch plain data parallelism (ACCELERATE_USE_CPU=1 accelerate launch "
            "--multi_gpu ...); on GPUs drop ACCELERATE_USE_CPU"
        )
    if kind == DistributedType.FSDP and not uses_fsdp(accelerator):
        raise ConfigError(
            "FSDP1 (fsdp_version 1) is not supported: it flattens parameters, so the KL and the "
            "checkpoints cannot see the LoRA tensors. Launch FSDP2 instead: accelerate launch "
            "--use_fsdp --fsdp_version 2 ... (or fsdp_version: 2 in the Accelerate config)"
        )
    refused = {
        DistributedType.DEEPSPEED: "DeepSpeed",
        DistributedType.MEGATRON_LM: "Megatron-LM",
    }
    if kind in refused:
        raise ConfigError(
            f"{refused[kind]} is not supported: the KL and the checkpoints are computed on "
            "LoRA tensors that its engine partitions. To shard a base model too large for one "
            "GPU launch FSDP2 (accelerate launch --use_fsdp --fsdp_version 2 ...); otherwise "
            "plain data parallelism (accelerate launch --multi_gpu); to save memory also "
            "--dtype bfloat16 or --load-in-4bit (the latter under --multi_gpu only)"
        )


def check_fsdp_settings(accelerator: Accelerator, load_in_4bit: bool, load_in_8bit: bool) -> None:
    """Under FSDP, refuse what sharding cannot do here, each time naming what to do instead."""
    if not uses_fsdp(accelerator):
        return
    if load_in_4bit or load_in_8bit:
        flag = "--load-in-4bit" if load_in_4bit else "--load-in-8bit"
        raise ConfigError(
            f"{flag} cannot be combined with FSDP: bitsandbytes' quantised weights are not "
            "sharded by FSDP2 (every process would hold the whole base anyway). Either shard a "
            f"bfloat16 base (drop {flag}, add --dtype bfloat16), or keep the quantised base "
            "and launch plain data parallelism (accelerate launch --multi_gpu)"
        )
    if accelerator.mixed_precision == "fp16":
        raise ConfigError(
            "fp16 mixed precision is not supported under FSDP (its gradient scaler is not "
            "applied to the KL step there). Use --mixed_precision bf16 (or no) with FSDP, or "
            "fp16 under plain data parallelism (accelerate launch --multi_gpu --mixed_precision "
            "fp16)"
        )


def check_fsdp_method(accelerator: Accelerator, method: str, refusal: str | None) -> None:
    """Under FSDP, refuse a method that cannot train sharded (``Method.fsdp_refusal``), before
    the model loads and the run folder is made: a refusal at its first step left a folder that
    blocked the retry it advised."""
    if refusal is not None and uses_fsdp(accelerator):
        raise ConfigError(
            f"--method {method} is not supported under FSDP ({refusal}); train it with plain "
            "data parallelism (accelerate launch --multi_gpu) or on one process"
        )


def check_curve_launch(accelerator: Accelerator, curve_every: int) -> None:
    """``--curve-every`` scores on the main process only: refused on several processes before
    the run folder is made (refused after it, the folder blocked the retry)."""
    if curve_every and accelerator.num_processes > 1:
        raise ConfigError("--curve-every runs on one process only; drop it under accelerate launch")


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every process) cut like ``param``: this process's
    shard when ``param`` is a DTensor (no communication), ``value`` itself otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return value
    value = value.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def shard_optimizer_state(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> dict[str, Any]:
    """A saved (whole-tensor) optimiser state cut like the optimiser's sharded parameters, so
    that ``load_state_dict`` restores it under FSDP (per-parameter states such as AdamW's
    moments have the parameter's shape; scalars such as ``step`` stay as they are)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for key, per_param in state_dict.get("state", {}).items():
        param = params[int(key)]
        state[key] = {
            name: shard_like(v, param)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == tuple(param.shape)
            else v
            for name, v in per_param.items()
        }
    return {**state_dict, "state": state}


#: how long the other processes may wait for a step only the main process runs when that step
#: can be long (``on_main(..., patient=True)``: a Laplace fit, a TFB search, copying runs)
MAIN_STEP_TIMEOUT = timedelta(hours=24)


def on_main(
    accelerator: Accelerator | PartialState, fn: Callable[[], T], *, patient: bool = False
) -> T:
    """Run ``fn`` on the main process and hand its result, or its error, to every process.

    Without this a failure on the main process (a refused --out, a full disk) would leave the
    other processes waiting at the next collective forever.

    ``patient``: ``fn`` may run longer than the process group's timeout (torch's default: 10
    minutes under NCCL, 30 under gloo), as a Laplace fit of a large model on the main process
    does; waited for at the default group's barrier, the others' watchdog ended the launch
    after the training was done. The result then travels in a gloo group of its own, made by
    every process before ``fn`` starts, with :data:`MAIN_STEP_TIMEOUT`; no collective of the
    default group is pending meanwhile, so its timeout keeps catching real hangs elsewhere.
    """
    if accelerator.num_processes == 1:
        return fn()
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=MAIN_STEP_TIMEOUT) if patient else None
    try:
        return _run_on_main(accelerator, fn, group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def _run_on_main(accelerator: Accelerator | PartialState, fn: Callable[[], T], group: Any) -> T:
    import torch.distributed as dist

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
    if group is None:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(payload)
    else:
        dist.broadcast_object_list(payload, src=0, group=group)
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
