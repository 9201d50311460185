"""The training loop on ``accelerate.Accelerator``: one CPU, one GPU or many processes.

Loss per optimiser step: mean NLL over the (global) batch + pi_i * KL. Under DDP every process
holds the same adapter, so the KL and its weight are identical everywhere while the NLL
gradient is averaged across processes: 2 processes at batch b optimise the same objective as
1 process at batch 2b (Accelerate hands process k the k-th of every ``world`` consecutive
batches of the seeded order, so the global batches hold the same examples too). The KL cycle
is computed from the global batch, and the KL gradient is taken with ``autograd.grad`` so that
no DDP all-reduce averages a term that is already identical on every process. With
``--grad-accum`` the NLL is the mean over the micro-batches of the window; the last window of
an epoch may hold fewer (``micro_per_epoch % grad_accum``) and is averaged over those it holds,
so its step equals one step on a batch of those examples (it is still one step of the KL cycle).
With ``--length-chunks K`` each micro-batch is forwarded as K chunks of similar length
(``tasks.dataset.split_by_length``) whose NLLs sum to the micro-batch's mean: the same gradient
with less padding, up to float rounding; weight noise and dropout masks are drawn per chunk
(BLoB's ``shared`` flipout then draws K samples per micro-batch, not one).

Every decision that must be collective is made collectively: the stop on SIGINT/SIGTERM, a
non-finite loss, and the success of each checkpoint write (written by the main process only).
Checkpoints record the data position in examples, so a run may be resumed on another number
of processes with the same global batch (``--batch-size``/``--grad-accum`` adjusted).

Under FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2``) every parameter, the frozen base
and the adapter alike, is a DTensor shard. The same loop then holds: the KL is computed on the
shards and summed across processes once (DTensor arithmetic; before the forward, when every
parameter is a shard), its gradient lands on each shard directly while FSDP reduce-scatters
and averages the NLL gradient into the same ``.grad``; checkpoints and the saved adapter hold
whole tensors (gathered on every process, written by the main one), so a run resumes on any
number of processes with or without FSDP. FSDP1 and DeepSpeed are refused
(``training.distributed.check_launch``), as are a quantised base and fp16 under FSDP.

This is the loop only: which method to train, evaluating the result and writing
``summary.json`` belong to ``blob_lora.pipeline``, which calls :func:`run_training`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader

from blob_lora.methods.base import Method, StepSchedule
from blob_lora.models import load_model_and_tokenizer
from blob_lora.models.forward import answer_logits
from blob_lora.models.prefix_cache import PrefixFeatureCache
from blob_lora.tasks import MCDataset, Task, TaskInputs, get_task, task_inputs
from blob_lora.tasks.dataset import (
    IndexedCollator,
    IndexedDataset,
    length_bucketed_sampler,
    split_by_length,
)
from blob_lora.training import checkpoint as ckpt
from blob_lora.training.config import TrainConfig
from blob_lora.training.distributed import (
    all_true,
    check_fsdp_settings,
    check_launch,
    full_tensors,
    gather_rng,
    on_main,
    reduce_window,
    shard_like,
    shard_optimizer_state,
    uses_fsdp,
)
from blob_lora.training.kl_schedule import KLSchedule, make_schedule
from blob_lora.training.optim import Updater, build_updater, split_parameters
from blob_lora.training.run_dir import (
    ADAPTER_DIR,
    CHECKPOINTS,
    TRAIN_LOG,
    check_run_dir,
    prepare_run_dir,
)
from blob_lora.training.sampler import EpochShuffleSampler
from blob_lora.training.signals import StopSignals, TrainingInterrupted
from blob_lora.utils.atomic import atomic_directory, atomic_write_text
from blob_lora.utils.errors import BlobLoraError, CheckpointError, ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


class TrainingDiverged(BlobLoraError):
    """The loss became NaN or infinite."""


class LearningCurve(Protocol):
    """Scores the model on held-out data during training (``--curve-every``).

    The pipeline builds it (``blob_lora.evaluation.curve``), so the loop itself evaluates
    nothing; the loop only calls ``record`` and trims ``path`` on resume.
    """

    path: Path

    def record(self, model: nn.Module, step: int, epoch: int) -> Any: ...


#: ``(cfg, model, method, task, tokenizer, accelerator, out) -> LearningCurve | None``, called
#: once the model is prepared and the run folder exists.
CurveFactory = Callable[
    [TrainConfig, nn.Module, Method, Task, "PreTrainedTokenizerBase", "Accelerator", Path],
    LearningCurve | None,
]


@dataclass(frozen=True)
class RunStart:
    """How a run starts: over a finished run (``overwrite``) or from its last checkpoint
    (``resume``), with progress bars or not, on the caller's base model and tokenizer (tests,
    notebooks) or, when ``base_model`` is ``None``, on ``cfg.base.model``."""

    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    base_model: nn.Module | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    #: finished plain runs a composite run may take as sub-runs that would train exactly as
    #: they did (``pipeline.composite.share_finished_run``)
    finished_runs: tuple[Path, ...] = ()


@dataclass
class TrainedRun:
    """What the loop hands the pipeline: the run's summary so far and what evaluation needs."""

    summary: dict[str, Any]
    model: nn.Module  # the trained PeftModel, unwrapped from any DDP wrapper
    tokenizer: PreTrainedTokenizerBase
    task: Task
    accelerator: Accelerator


@dataclass
class _StepPlan:
    """How many micro-batches and optimiser steps the run takes, and its KL schedule."""

    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    schedule: KLSchedule


def build_model(cfg: TrainConfig) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The base model and tokenizer that ``cfg`` names (``--model``, dtype, quantisation)."""
    base, tokenizer = load_model_and_tokenizer(
        cfg.base.model,
        dtype=cfg.base.dtype,
        load_in_8bit=cfg.base.load_in_8bit,
        load_in_4bit=cfg.base.load_in_4bit,
        trust_remote_code=cfg.base.trust_remote_code,
    )
    return base, tokenizer


@dataclass
class PreparedTraining:
    """Everything a run needs before its first step: the loop (adapter, optimisers, loader,
    schedule; nothing trained yet), the task and its tokenised training split.

    ``run_training`` starts and runs ``loop`` to the end; ``bench/train_full_step.py`` drives
    the same loop step by step (``loop.steps()``) to time it.
    """

    loop: TrainingLoop
    task: Task
    train_split: str
    inputs: TaskInputs
    tokenizer: PreTrainedTokenizerBase
    accelerator: Accelerator
    unwrapped: nn.Module
    resuming: bool


def prepare_training(
    cfg: TrainConfig,
    method: Method,
    start: RunStart | None = None,
    *,
    curve: CurveFactory | None = None,
) -> PreparedTraining:
    """Build everything ``run_training`` trains with, and create the run folder (``cfg.out``).

    Nothing is trained: call ``loop.start(...)`` then ``loop.run()`` (or ``loop.steps()``).
    """
    from accelerate import Accelerator

    start = start or RunStart()
    overwrite, resume = start.overwrite, start.resume
    base_model, tokenizer = start.base_model, start.tokenizer

    if cfg.evaluation.curve_every and curve is None:
        raise ConfigError("--curve-every needs the held-out scorer of blob_lora.pipeline.train")
    out = Path(cfg.out)
    accelerator = Accelerator(log_with=cfg.loop.log_with, project_dir=str(out))
    check_launch(accelerator)
    check_fsdp_settings(accelerator, cfg.base.load_in_4bit, cfg.base.load_in_8bit)
    # Refuse a wrong --out before the slow loads; create the folder only after them.
    config = cfg.to_dict()
    on_main(accelerator, lambda: check_run_dir(out, config, overwrite=overwrite, resume=resume))

    if base_model is None:
        base_model, tokenizer = build_model(cfg)
    task, train_split, inputs = _training_inputs(cfg, tokenizer, accelerator)
    model = _build_adapter(cfg, method, base_model, accelerator)
    loader = _training_loader(cfg, inputs, accelerator)
    plan = _plan_steps(cfg, loader, len(inputs.dataset), accelerator)
    schedule = StepSchedule(plan.total_steps, plan.steps_per_epoch)
    updater = build_updater(
        model,
        mode=cfg.loop.optimizer,
        bayesian=method.has_kl,
        lr=cfg.loop.lr,
        total_steps=plan.total_steps,
        warmup_ratio=cfg.loop.warmup_ratio,
        weight_decay=method.weight_decay(cfg),
        kl_lr=cfg.kl.kl_lr,
        std_lr=cfg.kl.std_lr,
        reshape=lambda factor: method.lr_factor(cfg, schedule, factor),
    )
    model = _prepare(accelerator, model, updater)
    unwrapped = accelerator.unwrap_model(model)

    # Everything that reads user input has run: only now is the run folder created.
    resuming = on_main(
        accelerator,
        lambda: (
            prepare_run_dir(out, config, overwrite=overwrite, resume=resume)
            and _has_checkpoint(out)
        ),
    )
    held_out = curve(cfg, unwrapped, method, task, tokenizer, accelerator, out) if curve else None
    loop = TrainingLoop(
        cfg, method, accelerator, model, updater, loader, inputs.option_ids, plan, held_out
    )
    return PreparedTraining(
        loop, task, train_split, inputs, tokenizer, accelerator, unwrapped, resuming
    )


def run_training(
    cfg: TrainConfig,
    method: Method,
    start: RunStart | None = None,
    *,
    curve: CurveFactory | None = None,
) -> TrainedRun:
    """Train ``method`` on ``cfg.data.task`` into ``cfg.out``: adapter, checkpoints, train log.

    ``start`` says how (a fresh run on ``cfg.base.model`` by default); ``curve`` builds the
    held-out scorer of ``--curve-every``. Nothing is evaluated and no ``summary.json`` is
    written: that is the pipeline's (``blob_lora.pipeline.train``).
    """
    start = start or RunStart()
    prepared = prepare_training(cfg, method, start, curve=curve)
    loop, accelerator, unwrapped = prepared.loop, prepared.accelerator, prepared.unwrapped
    inputs, task = prepared.inputs, prepared.task
    loop.start(prepared.resuming, inputs.dataset, start.progress)
    loop.run()
    train_seconds = loop.finish()
    method.finish_training(unwrapped)  # e.g. SWAG: the adapter becomes the SWA mean
    _save_adapter(accelerator, unwrapped, Path(cfg.out), method)
    summary: dict[str, Any] = {
        "method": cfg.method,
        "task": task.name,
        "train_split": prepared.train_split,
        "n_train": len(inputs.dataset),
        "steps": loop.step,
        "steps_per_epoch": loop.plan.steps_per_epoch,
        "kl_cycle": loop.plan.schedule.cycle if method.has_kl else None,
        "world_size": accelerator.num_processes,
        "fsdp": uses_fsdp(accelerator),
        "train_seconds": round(train_seconds, 3),
        "seconds_per_step": round(train_seconds / max(1, loop.step), 4),
        # blocks whose output was computed once per example and reused (0: none)
        "prefix_cached_blocks": loop.prefix.start if loop.prefix is not None else 0,
        **method.training_summary(unwrapped, cfg, loop.schedule),
        "evaluations": {},
    }
    return TrainedRun(summary, unwrapped, prepared.tokenizer, task, accelerator)


def _prepare(accelerator: Accelerator, model: nn.Module, updater: Updater) -> nn.Module:
    """Hand the model and the optimisers to Accelerate (DDP wrapper, device, mixed precision).

    FSDP2 shards the model in place, replacing every parameter by a DTensor, so Accelerate
    takes model and optimisers together and points the optimisers at the new parameters; the
    updater's own parameter lists (the paper step's KL gradient) are then rebuilt from the
    sharded model, in the same order.
    """
    if not uses_fsdp(accelerator):
        model = accelerator.prepare_model(model)
        updater.optimizers = [accelerator.prepare_optimizer(o) for o in updater.optimizers]
        return model
    model, *optimizers = accelerator.prepare(model, *updater.optimizers)
    updater.optimizers = optimizers
    updater.point_params, updater.std_params = split_parameters(accelerator.unwrap_model(model))
    return model


def _training_inputs(
    cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, accelerator: Accelerator
) -> tuple[Task, str, TaskInputs]:
    """The task, the training split's name and its tokenised dataset."""
    task = get_task(cfg.data.task, data_root=cfg.data.data_root)
    if task.train_split is None and cfg.data.train_split is None:
        raise BlobLoraError(f"task {task.name} has no training split; pass --train-split")
    train_split = cfg.data.train_split or "train"
    inputs = task_inputs(
        task,
        train_split,
        tokenizer,
        cfg.data.max_length,
        scoring=cfg.data.scoring_spec,
        cache_dir=cfg.data.cache_dir,
        device=accelerator.device,
    )
    return task, train_split, inputs


def _build_adapter(
    cfg: TrainConfig, method: Method, base_model: nn.Module, accelerator: Accelerator
) -> nn.Module:
    """The method's adapter on the base model, initialised identically on every process; the
    global RNG is then reseeded per process so that weight noise is independent."""
    from accelerate.utils import set_seed

    set_seed(cfg.loop.seed)  # identical adapter initialisation on every process
    try:
        model = method.build(base_model, cfg)
    except ValueError as exc:  # PEFT: no module matches --target-modules, unsupported layer
        if isinstance(exc, BlobLoraError):
            raise
        raise ConfigError(
            f"cannot put a {cfg.method} adapter on {cfg.base.model}: {exc} "
            f"(--target-modules {','.join(cfg.lora.target_modules)})"
        ) from exc
    set_seed(cfg.loop.seed + accelerator.process_index)  # independent noise per process
    return model


def _training_loader(cfg: TrainConfig, inputs: TaskInputs, accelerator: Accelerator) -> DataLoader:
    """The seeded, resumable data order, sharded over processes by Accelerate."""
    dataset = inputs.dataset
    # Items carry their dataset index so the prefix cache can look their features up.
    collator = IndexedCollator(inputs.collator)
    indexed = IndexedDataset(dataset)
    # The loader gets its own generator: creating an iterator draws a seed from it, and drawing
    # from the global RNG instead would shift the weight-noise stream after a resume.
    loader_rng = torch.Generator().manual_seed(cfg.loop.seed)
    if cfg.data.bucket_by_length:
        batch_sampler = length_bucketed_sampler(
            dataset.lengths, cfg.loop.batch_size, seed=cfg.loop.seed
        )
        loader = DataLoader(
            indexed, batch_sampler=batch_sampler, collate_fn=collator, generator=loader_rng
        )
    else:
        sampler = EpochShuffleSampler(len(dataset), cfg.loop.seed)
        loader = DataLoader(
            indexed,
            batch_size=cfg.loop.batch_size,
            sampler=sampler,
            collate_fn=collator,
            generator=loader_rng,
        )
    return accelerator.prepare_data_loader(loader)


def _plan_steps(
    cfg: TrainConfig, loader: DataLoader, n_train: int, accelerator: Accelerator
) -> _StepPlan:
    """Steps per epoch and in total (``--max-steps`` or ``--epochs``), and the KL schedule
    computed from the global batch."""
    micro_per_epoch = len(loader)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.loop.grad_accum))
    if cfg.loop.max_steps is not None:
        total_steps = cfg.loop.max_steps
    else:
        total_steps = max(1, int(round((cfg.loop.epochs or 1.0) * steps_per_epoch)))
    global_batch = cfg.loop.batch_size * cfg.loop.grad_accum * accelerator.num_processes
    schedule = make_schedule(
        cfg.kl.kl_schedule,
        n_train,
        steps_per_epoch,
        global_batch,
        cfg.kl.kl_rescale,
        cfg.kl.kl_gamma,
    )
    return _StepPlan(micro_per_epoch, steps_per_epoch, total_steps, global_batch, schedule)


class TrainingLoop:
    """The optimiser-step loop of one run: its position, logging window and checkpoints.

    Why a class: the position (step, epoch, micro-batch), the resumed training time and the
    logging window are shared by the step, the checkpoint writer and the final save.

    The step's sections carry ``torch.profiler`` labels (``train.forward``, ``train.backward``,
    ``train.update`` with ``train.update.kl``, ``train.kl``, ``train.log``), so that a profile
    of a real run says where its time goes (``bench/train_full_step.py --profile``); without
    an active profiler they cost nothing measurable.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        method: Method,
        accelerator: Accelerator,
        model: nn.Module,
        updater: Updater,
        loader: DataLoader,
        option_ids: torch.Tensor | None,
        plan: _StepPlan,
        curve: LearningCurve | None,
    ) -> None:
        self.cfg, self.method, self.accelerator = cfg, method, accelerator
        self.model, self.unwrapped = model, accelerator.unwrap_model(model)
        self.updater, self.loader, self.option_ids = updater, loader, option_ids
        self.plan, self.curve = plan, curve
        self.schedule = StepSchedule(plan.total_steps, plan.steps_per_epoch)
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / CHECKPOINTS
        self.log_path = self.out / TRAIN_LOG
        self.step, self.epoch, self.micro_done = 0, 0, 0
        self.seconds_before = 0.0  # training time of earlier sittings of a resumed run
        self.layout = {
            "world_size": accelerator.num_processes,
            "batch_size": cfg.loop.batch_size,
            "grad_accum": cfg.loop.grad_accum,
            "global_batch": plan.global_batch,
        }
        self.prefix: PrefixFeatureCache | None = None
        self.window: dict[str, float] = {"nll": 0.0, "correct": 0.0, "n": 0.0, "micro": 0.0}
        self.signals = StopSignals()

    def start(self, resuming: bool, dataset: MCDataset, progress: bool) -> None:
        """Restore a checkpoint, open trackers and logs, and build the frozen-prefix cache."""
        cfg, accelerator = self.cfg, self.accelerator
        if resuming:
            self.step, self.epoch, self.micro_done, self.seconds_before = _restore(
                self.ckpt_root, self.unwrapped, self.updater, accelerator, self.layout, self.method
            )
        if cfg.loop.log_with:
            accelerator.init_trackers("blob-lora", config=_flat_config(cfg))
        self.trainable = {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        if accelerator.is_main_process:
            _truncate_log(self.log_path, self.step)
            if self.curve is not None:
                _truncate_log(self.curve.path, self.step)
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.plan.total_steps,
            initial=self.step,
            desc=f"train {cfg.method}",
            disable=not (progress and accelerator.is_local_main_process),
        )
        self.model.train()
        # Frozen blocks below the first adapter run once per example, not once per epoch (one
        # process only: each process would need the features of its own shard).
        if cfg.base.prefix_cache and accelerator.num_processes == 1:
            self.prefix = PrefixFeatureCache.for_dataset(
                self.unwrapped, dataset, cfg.data.cache_dir
            )
        self.started = time.perf_counter()

    def save(self, step: int, epoch: int, micro: int) -> None:
        """Checkpoint the adapter, optimiser, RNG streams and data position (main process)."""
        cfg, accelerator = self.cfg, self.accelerator
        states = gather_rng(accelerator)
        # whole tensors: under FSDP every process takes part in gathering its shards
        trainable = full_tensors(self.trainable)
        optim = full_tensors(self.updater.state_dict())
        method_state = self.method.training_state(self.unwrapped)
        loop_state = {
            "epoch": epoch,
            "micro_in_epoch": micro,
            # world-size independent position: examples of this epoch already consumed
            "examples_in_epoch": micro * cfg.loop.batch_size * accelerator.num_processes,
            # summed over sittings, so a resumed run reports its whole training cost
            "train_seconds": self.seconds_before + time.perf_counter() - self.started,
            **self.layout,
        }
        on_main(
            accelerator,
            lambda: ckpt.save_checkpoint(
                self.ckpt_root,
                step,
                trainable,
                optim,
                states,
                loop_state,
                method_state=method_state,
            ),
        )

    def run(self) -> None:
        """Optimiser steps until ``total_steps``, epoch after epoch, from the restored position."""
        with self.signals:
            for _ in self.steps():
                pass

    def steps(self) -> Iterator[int]:
        """Take the optimiser steps, yielding the step number after each one (with its
        logging and checkpoint); ``run`` takes them all under the signal handlers."""
        accelerator, total_steps = self.accelerator, self.plan.total_steps
        while self.step < total_steps:
            self.loader.set_epoch(self.epoch)
            micro_done = self.micro_done
            batches = (
                accelerator.skip_first_batches(self.loader, micro_done)
                if micro_done
                else self.loader
            )
            micro = micro_done
            for batch in batches:
                micro += 1
                before = self.step
                if self._micro_step(batch, micro, self.signals):
                    break  # the last step: yielded below, once the position is recorded
                if self.step != before:
                    yield self.step
            else:
                self.epoch += 1
                self.micro_done = 0
                continue
            at_epoch_end = micro == self.plan.micro_per_epoch
            self.epoch, self.micro_done = (
                (self.epoch + 1, 0) if at_epoch_end else (self.epoch, micro)
            )
            yield self.step

    def _micro_step(self, batch: dict[str, torch.Tensor], micro: int, signals: StopSignals) -> bool:
        """Forward and backward one micro-batch (in ``--length-chunks`` chunks of similar
        length), and step the optimiser at a boundary; True once the last step is done."""
        cfg, accelerator, method = self.cfg, self.accelerator, self.method
        boundary = micro % cfg.loop.grad_accum == 0 or micro == self.plan.micro_per_epoch
        pi = self.plan.schedule.weight(self.step + 1) if method.has_kl else 0.0
        kl_value = None
        if method.has_kl and self.updater.mode == "single":
            # before the forward: under FSDP every parameter is then a shard (after it the
            # head's are still gathered), and the KL is summed over the shards once
            with record_function("train.kl"):
                kl_value = full_tensors(method.kl(self.unwrapped))
        n = len(batch["labels"])
        chunks = split_by_length(batch, cfg.loop.length_chunks)
        # read once after the chunks: one device sync per micro-batch, not one per chunk
        losses: list[torch.Tensor] = []
        nll_total: torch.Tensor | float = 0.0
        correct: torch.Tensor | int = 0
        for j, chunk in enumerate(chunks):
            last = j == len(chunks) - 1
            # gradients are synchronised once per optimiser step: on the last chunk of the
            # window's last micro-batch
            sync = nullcontext() if boundary and last else accelerator.no_sync(self.model)
            index = chunk.pop("index")
            with sync:
                prefix = self.prefix
                with (
                    prefix.injected(self.unwrapped, chunk, index) if prefix else nullcontext(),
                    record_function("train.forward"),
                ):
                    logits = answer_logits(self.model, chunk, self.option_ids)
                # the micro-batch's mean NLL, summed over its chunks (one chunk: bit for bit
                # the mean of runs made before chunks existed); the KL once
                nll = F.cross_entropy(logits, chunk["labels"], reduction="sum") / n
                loss = nll if kl_value is None or j > 0 else nll + pi * kl_value
                losses.append(loss.detach())
                if last:
                    self._stop_if_not_finite(torch.stack(losses))
                # mean over the micro-batches of this window: the last window of an epoch may
                # hold fewer than --grad-accum, and its NLL must not be shrunk against pi * KL
                with record_function("train.backward"):
                    accelerator.backward(loss / self._window_size(micro))
            nll_total = nll_total + nll.detach()
            correct = correct + (logits.argmax(-1) == chunk["labels"]).sum()
        self.window["nll"] += float(nll_total)
        self.window["correct"] += int(correct)
        self.window["micro"] += 1
        self.window["n"] += n
        if not boundary:
            return False
        self._optimizer_step(kl_value, pi, micro, signals)
        return self.step >= self.plan.total_steps

    def _stop_if_not_finite(self, losses: torch.Tensor) -> None:
        """Stop the run on every process alike if a loss of this micro-batch is not finite: one
        collective decision, before the backward that synchronises the gradients."""
        finite = torch.isfinite(losses)
        if all_true(self.accelerator, bool(finite.all())):
            return
        bad = losses[~finite]  # empty when only another process diverged
        value = (bad[0] if len(bad) else losses[-1]).item()
        raise TrainingDiverged(
            f"loss became {value} at step {self.step + 1} (on at least one process); the last "
            f"good checkpoint is kept in {self.ckpt_root} (lower --lr or check the data)"
        )

    def _window_size(self, micro: int) -> int:
        """How many micro-batches the accumulation window of the 1-based ``micro`` holds:
        ``--grad-accum``, or the remainder for the last window of an epoch."""
        grad_accum = self.cfg.loop.grad_accum
        first = (micro - 1) // grad_accum * grad_accum  # micro-batches before this window
        return min(grad_accum, self.plan.micro_per_epoch - first)

    def _optimizer_step(
        self, kl_value: torch.Tensor | None, pi: float, micro: int, signals: StopSignals
    ) -> None:
        """One optimiser step: update, log, record the curve, checkpoint, stop on a signal."""
        cfg, method, unwrapped = self.cfg, self.method, self.unwrapped
        kl_fn = (lambda: full_tensors(method.kl(unwrapped))) if method.has_kl else None
        with record_function("train.update"):
            used_kl = self.updater.step(kl_fn, pi)
        if kl_value is None:
            kl_value = used_kl
        self.step += 1
        step = self.step
        # before the curve and any checkpoint of this step: both see what the method kept
        method.after_step(unwrapped, cfg, step, self.schedule)
        # totals over every process: the logged NLL is the mean over the global batch
        totals, stop = reduce_window(self.accelerator, self.window, signals.received is not None)
        record = {
            "step": step,
            "epoch": self.epoch,
            "nll": totals["nll"] / totals["micro"],
            "acc": totals["correct"] / max(1.0, totals["n"]),
            "kl": float(torch.as_tensor(kl_value).detach()) if kl_value is not None else None,
            "pi": pi,
            "lr": self.updater.optimizers[0].param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        self.window = dict.fromkeys(self.window, 0.0)
        with record_function("train.log"):
            self._report(record)
        at_epoch_end = micro == self.plan.micro_per_epoch
        position = (self.epoch + 1, 0) if at_epoch_end else (self.epoch, micro)
        total_steps = self.plan.total_steps
        if self.curve is not None and (
            step % cfg.evaluation.curve_every == 0 or step >= total_steps
        ):
            self.curve.record(unwrapped, step, self.epoch)
        if (
            cfg.loop.checkpoint_every
            and step % cfg.loop.checkpoint_every == 0
            and step < total_steps
        ):
            self.save(step, *position)
        if stop:  # decided together: every process saves the same step
            self.save(step, *position)
            what = f"signal {signals.received}" if signals.received else "a signal"
            raise TrainingInterrupted(
                f"stopped by {what} after step {step}; checkpoint saved in "
                f"{self.ckpt_root}, continue with --resume"
            )

    def _report(self, record: dict[str, Any]) -> None:
        """Show a step on the progress bar, append it to the train log and the trackers."""
        cfg, accelerator = self.cfg, self.accelerator
        self.bar.update(1)
        self.bar.set_postfix(
            nll=f"{record['nll']:.3f}",
            kl=f"{record['kl']:.1f}" if record["kl"] is not None else "-",
            pi=f"{record['pi']:.2e}",
            acc=f"{record['acc']:.2f}",
        )
        if accelerator.is_main_process and record["step"] % cfg.loop.log_every == 0:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.loop.log_with:
            accelerator.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def finish(self) -> float:
        """Close the bar, keep the prefix features and write the final checkpoint; return the
        training seconds of all sittings."""
        self.bar.close()
        train_seconds = self.seconds_before + time.perf_counter() - self.started
        if self.prefix is not None:
            on_main(self.accelerator, self.prefix.save)
        self.save(self.step, self.epoch, self.micro_done)
        return train_seconds


def _save_adapter(accelerator: Accelerator, model: nn.Module, out: Path, method: Method) -> None:
    """Write ``RUN/adapter/`` atomically on the main process (the final checkpoint is kept),
    with the method's own files beside the PEFT adapter (``Method.save_extras``).

    Under FSDP the model's state dict holds shards: the adapter's tensors (``lora_*``, not the
    sharded base) are gathered whole on every process first, and PEFT saves those.
    """
    kwargs: dict[str, Any] = {}
    if uses_fsdp(accelerator):
        kwargs["state_dict"] = {
            name: full_tensors(p.detach())
            for name, p in model.named_parameters()
            if "lora_" in name
        }

    def save() -> None:
        try:
            with atomic_directory(out / ADAPTER_DIR) as tmp:
                model.save_pretrained(tmp, save_embedding_layers=False, **kwargs)
                method.save_extras(model, tmp)
        except OSError as exc:
            raise CheckpointError(
                f"could not write the adapter to {out / ADAPTER_DIR} ({exc}); the final "
                f"checkpoint in {out / CHECKPOINTS} is intact: free space, then run again with "
                "--resume"
            ) from exc

    on_main(accelerator, save)


def _has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).glob("step-*"))


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, int | float | str | bool) else str(v))
        for k, v in cfg.to_dict().items()
    }


def _restore(
    root: Path, unwrapped, updater, accelerator, layout: dict[str, int], method: Method
) -> tuple[int, int, int, float]:
    """Load the latest checkpoint: (step, epoch, micro-batch in epoch, training seconds so far)."""
    path = ckpt.latest_checkpoint(root)
    if path is None:
        return 0, 0, 0, 0.0
    state = ckpt.load_checkpoint(path)
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
