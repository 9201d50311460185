"""The training loop on ``accelerate.Accelerator``: one CPU, one GPU or many processes.

Loss per optimiser step: mean NLL over the (global) batch + pi_i * KL. Under DDP every process
holds the same adapter, so the KL and its weight are identical everywhere while the NLL
gradient is averaged across processes: 2 processes at batch b optimise the same objective as
1 process at batch 2b (Accelerate hands process k the k-th of every ``world`` consecutive
batches of the seeded order, so the global batches hold the same examples too). The KL cycle
is computed from the global batch, and the KL gradient is taken with ``autograd.grad`` so that
no DDP all-reduce averages a term that is already identical on every process.

Every decision that must be collective is made collectively: the stop on SIGINT/SIGTERM, a
non-finite loss, and the success of each checkpoint write (written by the main process only).
Checkpoints record the data position in examples, so a run may be resumed on another number
of processes with the same global batch (``--batch-size``/``--grad-accum`` adjusted). FSDP and
DeepSpeed are refused: the adapter is small, is replicated on every process, and the KL and
the checkpoints are computed on the full adapter.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from blob_lora.methods import get_method
from blob_lora.models import load_model_and_tokenizer
from blob_lora.models.forward import answer_logits
from blob_lora.models.prefix_cache import PrefixFeatureCache
from blob_lora.tasks import get_task, task_inputs
from blob_lora.tasks.dataset import IndexedCollator, IndexedDataset, length_bucketed_sampler
from blob_lora.training import checkpoint as ckpt
from blob_lora.training.config import TrainConfig
from blob_lora.training.kl_schedule import make_schedule
from blob_lora.training.optim import build_updater
from blob_lora.training.run_dir import (
    ADAPTER_DIR,
    CHECKPOINTS,
    TRAIN_LOG,
    check_run_dir,
    prepare_run_dir,
)
from blob_lora.training.sampler import EpochShuffleSampler
from blob_lora.utils.atomic import atomic_directory, atomic_write_json, atomic_write_text
from blob_lora.utils.errors import BlobLoraError, CheckpointError, ConfigError

SUMMARY = "summary.json"


class TrainingDiverged(BlobLoraError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(BlobLoraError):
    """SIGINT/SIGTERM arrived; a checkpoint was written first."""


@dataclass
class _Signals:
    received: int | None = None

    def __enter__(self) -> _Signals:
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.received is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_model(cfg: TrainConfig):
    base, tokenizer = load_model_and_tokenizer(
        cfg.model,
        dtype=cfg.dtype,
        load_in_8bit=cfg.load_in_8bit,
        load_in_4bit=cfg.load_in_4bit,
        trust_remote_code=cfg.trust_remote_code,
    )
    return base, tokenizer


def train(
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    base_model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.task`` into ``cfg.out``; return the run summary.

    ``base_model``/``tokenizer`` may be passed in (tests, notebooks) instead of ``cfg.model``.
    """
    composite = getattr(get_method(cfg.method), "train_run", None)
    # ensemble, laplace, tfb: sub-runs of this loop (methods/composite.py)
    if composite is not None:
        kwargs = {"base_model": base_model, "tokenizer": tokenizer}
        return composite(cfg, overwrite=overwrite, resume=resume, progress=progress, **kwargs)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(cfg.out)
    accelerator = Accelerator(log_with=cfg.log_with, project_dir=str(out))
    _check_launch(accelerator)
    # Refuse a wrong --out before the slow loads; create the folder only after them.
    config = cfg.to_dict()
    _on_main(accelerator, lambda: check_run_dir(out, config, overwrite=overwrite, resume=resume))
    method = get_method(cfg.method)

    if base_model is None:
        base_model, tokenizer = build_model(cfg)
    task = get_task(cfg.task, data_root=cfg.data_root)
    if task.train_split is None and cfg.train_split is None:
        raise BlobLoraError(f"task {task.name} has no training split; pass --train-split")
    train_split = cfg.train_split or "train"
    inputs = task_inputs(
        task,
        train_split,
        tokenizer,
        cfg.max_length,
        scoring=cfg.scoring_spec,
        cache_dir=cfg.cache_dir,
        device=accelerator.device,
    )
    dataset, option_ids = inputs.dataset, inputs.option_ids

    set_seed(cfg.seed)  # identical adapter initialisation on every process
    try:
        model = method.build(base_model, cfg)
    except ValueError as exc:  # PEFT: no module matches --target-modules, unsupported layer
        if isinstance(exc, BlobLoraError):
            raise
        raise ConfigError(
            f"cannot put a {cfg.method} adapter on {cfg.model}: {exc} "
            f"(--target-modules {','.join(cfg.target_modules)})"
        ) from exc
    set_seed(cfg.seed + accelerator.process_index)  # independent noise per process

    # Items carry their dataset index so the prefix cache can look their features up.
    collator = IndexedCollator(inputs.collator)
    indexed = IndexedDataset(dataset)
    # The loader gets its own generator: creating an iterator draws a seed from it, and drawing
    # from the global RNG instead would shift the weight-noise stream after a resume.
    loader_rng = torch.Generator().manual_seed(cfg.seed)
    if cfg.bucket_by_length:
        batch_sampler = length_bucketed_sampler(dataset.lengths, cfg.batch_size, seed=cfg.seed)
        loader = DataLoader(
            indexed, batch_sampler=batch_sampler, collate_fn=collator, generator=loader_rng
        )
    else:
        sampler = EpochShuffleSampler(len(dataset), cfg.seed)
        loader = DataLoader(
            indexed,
            batch_size=cfg.batch_size,
            sampler=sampler,
            collate_fn=collator,
            generator=loader_rng,
        )
    loader = accelerator.prepare_data_loader(loader)
    micro_per_epoch = len(loader)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.grad_accum))
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
    else:
        total_steps = max(1, int(round((cfg.epochs or 1.0) * steps_per_epoch)))
    global_batch = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    schedule = make_schedule(
        cfg.kl_schedule, len(dataset), steps_per_epoch, global_batch, cfg.kl_rescale, cfg.kl_gamma
    )
    updater = build_updater(
        model,
        mode=cfg.optimizer,
        bayesian=method.has_kl,
        lr=cfg.lr,
        total_steps=total_steps,
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=method.weight_decay(cfg),
        kl_lr=cfg.kl_lr,
        std_lr=cfg.std_lr,
    )
    model = accelerator.prepare_model(model)
    updater.optimizers = [accelerator.prepare_optimizer(o) for o in updater.optimizers]
    unwrapped = accelerator.unwrap_model(model)

    # Everything that reads user input has run: only now is the run folder created.
    resuming = _on_main(
        accelerator,
        lambda: (
            prepare_run_dir(out, config, overwrite=overwrite, resume=resume)
            and _has_checkpoint(out)
        ),
    )
    curve = _held_out_curve(cfg, unwrapped, method, task, tokenizer, accelerator, out)
    step, epoch, micro_done = 0, 0, 0
    seconds_before = 0.0  # training time of earlier sittings of a resumed run
    ckpt_root = out / CHECKPOINTS
    layout = {
        "world_size": accelerator.num_processes,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "global_batch": global_batch,
    }
    if resuming:
        step, epoch, micro_done, seconds_before = _restore(
            ckpt_root, unwrapped, updater, accelerator, layout
        )
    if cfg.log_with:
        accelerator.init_trackers("blob-lora", config=_flat_config(cfg))

    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    log_path = out / TRAIN_LOG
    if accelerator.is_main_process:
        _truncate_log(log_path, step)
        if curve is not None:
            _truncate_log(curve.path, step)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"train {cfg.method}",
        disable=not (progress and accelerator.is_local_main_process),
    )

    def save(current_step: int, current_epoch: int, current_micro: int) -> None:
        states = _gather_rng(accelerator)
        loop_state = {
            "epoch": current_epoch,
            "micro_in_epoch": current_micro,
            # world-size independent position: examples of this epoch already consumed
            "examples_in_epoch": current_micro * cfg.batch_size * accelerator.num_processes,
            # summed over sittings, so a resumed run reports its whole training cost
            "train_seconds": seconds_before + time.perf_counter() - start,
            **layout,
        }
        _on_main(
            accelerator,
            lambda: ckpt.save_checkpoint(
                ckpt_root, current_step, trainable, updater.state_dict(), states, loop_state
            ),
        )

    model.train()
    # Frozen blocks below the first adapter run once per example, not once per epoch (one
    # process only: each process would need the features of its own shard).
    prefix = None
    if cfg.prefix_cache and accelerator.num_processes == 1:
        prefix = PrefixFeatureCache.for_dataset(unwrapped, dataset, cfg.cache_dir)
    start = time.perf_counter()
    window: dict[str, float] = {"nll": 0.0, "correct": 0.0, "n": 0.0, "micro": 0.0}
    with _Signals() as signals:
        while step < total_steps:
            loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, micro_done) if micro_done else loader
            micro = micro_done
            for batch in batches:
                micro += 1
                boundary = micro % cfg.grad_accum == 0 or micro == micro_per_epoch
                pi = schedule.weight(step + 1) if method.has_kl else 0.0
                sync = nullcontext() if boundary else accelerator.no_sync(model)
                index = batch.pop("index")
                with sync:
                    with prefix.injected(unwrapped, batch, index) if prefix else nullcontext():
                        logits = answer_logits(model, batch, option_ids)
                    nll = F.cross_entropy(logits, batch["labels"])
                    loss = nll
                    kl_value = None
                    if method.has_kl and updater.mode == "single":
                        kl_value = method.kl(unwrapped)
                        loss = loss + pi * kl_value
                    if not _all_true(accelerator, bool(torch.isfinite(loss))):
                        raise TrainingDiverged(
                            f"loss became {loss.item()} at step {step + 1} (on at least one "
                            "process); the last good checkpoint "
                            f"is kept in {ckpt_root} (lower --lr or check the data)"
                        )
                    accelerator.backward(loss / cfg.grad_accum)
                window["nll"] += nll.item()
                window["micro"] += 1
                window["correct"] += (logits.argmax(-1) == batch["labels"]).sum().item()
                window["n"] += len(batch["labels"])
                if not boundary:
                    continue
                kl_fn = (lambda: method.kl(unwrapped)) if method.has_kl else None
                used_kl = updater.step(kl_fn, pi)
                if kl_value is None:
                    kl_value = used_kl
                step += 1
                # totals over every process: the logged NLL is the mean over the global batch
                totals, stop = _reduce_window(accelerator, window, signals.received is not None)
                record = {
                    "step": step,
                    "epoch": epoch,
                    "nll": totals["nll"] / totals["micro"],
                    "acc": totals["correct"] / max(1.0, totals["n"]),
                    "kl": float(torch.as_tensor(kl_value).detach())
                    if kl_value is not None
                    else None,
                    "pi": pi,
                    "lr": updater.optimizers[0].param_groups[0]["lr"],
                    "seconds": round(time.perf_counter() - start, 3),
                }
                window = dict.fromkeys(window, 0.0)
                bar.update(1)
                bar.set_postfix(
                    nll=f"{record['nll']:.3f}",
                    kl=f"{record['kl']:.1f}" if record["kl"] is not None else "-",
                    pi=f"{pi:.2e}",
                    acc=f"{record['acc']:.2f}",
                )
                if accelerator.is_main_process and step % cfg.log_every == 0:
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                if cfg.log_with:
                    accelerator.log({k: v for k, v in record.items() if v is not None}, step=step)
                at_epoch_end = micro == micro_per_epoch
                position = (epoch + 1, 0) if at_epoch_end else (epoch, micro)
                if curve is not None and (step % cfg.curve_every == 0 or step >= total_steps):
                    curve.record(unwrapped, step, epoch)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                    save(step, *position)
                if stop:  # decided together: every process saves the same step
                    save(step, *position)
                    what = f"signal {signals.received}" if signals.received else "a signal"
                    raise TrainingInterrupted(
                        f"stopped by {what} after step {step}; checkpoint saved in "
                        f"{ckpt_root}, continue with --resume"
                    )
                if step >= total_steps:
                    break
            else:
                epoch += 1
                micro_done = 0
                continue
            epoch, micro_done = (epoch + 1, 0) if micro == micro_per_epoch else (epoch, micro)
    bar.close()
    train_seconds = seconds_before + time.perf_counter() - start
    if prefix is not None:
        _on_main(accelerator, prefix.save)
    save(step, epoch, micro_done)

    def save_adapter() -> None:
        try:
            with atomic_directory(out / ADAPTER_DIR) as tmp:
                unwrapped.save_pretrained(tmp, save_embedding_layers=False)
        except OSError as exc:
            raise CheckpointError(
                f"could not write the adapter to {out / ADAPTER_DIR} ({exc}); the final "
                f"checkpoint in {ckpt_root} is intact: free space, then run again with --resume"
            ) from exc

    _on_main(accelerator, save_adapter)
    summary: dict[str, Any] = {
        "method": cfg.method,
        "task": task.name,
        "train_split": train_split,
        "n_train": len(dataset),
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "kl_cycle": schedule.cycle if method.has_kl else None,
        "world_size": accelerator.num_processes,
        "train_seconds": round(train_seconds, 3),
        "seconds_per_step": round(train_seconds / max(1, step), 4),
        # blocks whose output was computed once per example and reused (0: none)
        "prefix_cached_blocks": prefix.start if prefix is not None else 0,
        "evaluations": {},
    }
    if cfg.evaluate:
        from blob_lora.evaluation.evaluate import evaluate_run_tasks

        summary["evaluations"] = evaluate_run_tasks(
            unwrapped,
            method,
            tokenizer,
            cfg,
            accelerator=accelerator,
            progress=progress,
            loaded_task=task,
        )

    def write_summary() -> None:
        try:
            atomic_write_json(out / SUMMARY, summary)
        except OSError as exc:
            raise BlobLoraError(f"could not write {out / SUMMARY}: {exc}") from exc

    _on_main(accelerator, write_summary)
    if cfg.log_with:
        accelerator.end_training()
    return summary


def _held_out_curve(cfg, model, method, task, tokenizer, accelerator, out: Path):
    """The learning-curve scorer of ``--curve-every`` (one process only), or ``None``."""
    if not cfg.curve_every:
        return None
    if accelerator.num_processes > 1:
        raise ConfigError("--curve-every runs on one process only; drop it under accelerate launch")
    from blob_lora.evaluation.curve import CURVE_FILE, HeldOutCurve

    inputs = task_inputs(
        task,
        cfg.curve_split,
        tokenizer,
        cfg.max_length,
        scoring=cfg.scoring_spec,
        cache_dir=cfg.cache_dir,
        device=accelerator.device,
    )
    requested = cfg.curve_samples if cfg.curve_samples is not None else cfg.eval_samples
    n = method.eval_samples(model, requested)
    return HeldOutCurve(
        model,
        method,
        inputs,
        n,
        cfg.eval_batch_size,
        out / CURVE_FILE,
        prefix_cache=cfg.prefix_cache,
    )


def _check_launch(accelerator) -> None:
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


def _on_main(accelerator, fn):
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


def _all_true(accelerator, flag: bool) -> bool:
    """``flag`` on every process (one tiny all-reduce; free on a single process)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item()) == 0.0


def _reduce_window(
    accelerator, window: dict[str, float], stop: bool
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


def _has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).glob("step-*"))


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, int | float | str | bool) else str(v))
        for k, v in cfg.to_dict().items()
    }


def _gather_rng(accelerator) -> list[dict[str, Any]]:
    from accelerate.utils import gather_object

    state = ckpt.rng_state()
    if accelerator.num_processes == 1:
        return [state]
    return gather_object([state])


def _restore(
    root: Path, unwrapped, updater, accelerator, layout: dict[str, int]
) -> tuple[int, int, int, float]:
    """Load the latest checkpoint: (step, epoch, micro-batch in epoch, training seconds so far)."""
    path = ckpt.latest_checkpoint(root)
    if path is None:
        return 0, 0, 0, 0.0
    state = ckpt.load_checkpoint(path)
    params = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (another base model or adapter "
            f"layout?): {len(unexpected)} saved tensors have no place, e.g. {unexpected[:2]}; "
            f"{len(missing)} trainable tensors are not saved, e.g. {missing[:2]}"
        )
    for name, value in saved.items():
        if params[name].shape != value.shape:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model (made for another base model?): "
                f"{name} has shape {tuple(value.shape)} there, {tuple(params[name].shape)} here"
            )
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
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    updater.load_state_dict(state["optim"])
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


def _truncate_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))
