"""What a run builds before its first step: the base model, the task's tokenised training
split, the method's adapter (initialised alike on every process), the seeded data order, the
step plan with its KL schedule, and the hand-over of model and optimisers to Accelerate.

Why a module of its own: ``training.trainer.prepare_training`` calls each of these once, in
order, and the loop (``training.loop``) only reads the plan they make.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from blob_lora.methods.base import Method
from blob_lora.models import load_model_and_tokenizer, load_tokenizer
from blob_lora.tasks import Task, TaskInputs, get_task, task_inputs
from blob_lora.tasks.dataset import IndexedCollator, IndexedDataset, length_bucketed_sampler
from blob_lora.tasks.dir_names import check_distinct_dirs
from blob_lora.training.config import TrainConfig
from blob_lora.training.distributed import uses_fsdp
from blob_lora.training.kl_schedule import KLSchedule, make_schedule
from blob_lora.training.optim import Updater, split_parameters
from blob_lora.training.sampler import EpochShuffleSampler
from blob_lora.tuners.lora import refuse_adapter
from blob_lora.utils.errors import BlobLoraError, ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


@dataclass
class StepPlan:
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


def load_tokenizer_of(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of ``cfg.base.model`` alone, for checks that need no model."""
    return load_tokenizer(cfg.base.model, trust_remote_code=cfg.base.trust_remote_code)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' activation checkpointing in the base model under ``model`` (a
    PEFT model): each decoder block keeps its input only and runs again in the backward.

    Non-reentrant checkpointing (``use_reentrant=False``): it needs no input that requires a
    gradient (the base is frozen, and below the first adapter nothing does), is the kind
    PyTorch recommends under FSDP2 (run by hand there on 2 CPU processes, not in the tests),
    and restores the RNG state before the recomputation, so BLoB's weight noise,
    Bayesian-LoRA's samples and MC-dropout's masks are drawn again exactly as in the forward:
    the gradients are those of the run without it
    (``tests/training/test_gradient_checkpointing.py``).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"--gradient-checkpointing: {type(base).__name__} does not support transformers' "
            "activation checkpointing; train without it"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_for_accelerate(
    accelerator: Accelerator, model: nn.Module, updater: Updater
) -> nn.Module:
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


def training_inputs(
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


def training_data(cfg: TrainConfig) -> str:
    """The fingerprint of the data ``cfg`` trains on (``Task.source_fingerprint`` of its
    training split: the file's content digest, or the Hub dataset's name)."""
    task = get_task(cfg.data.task, data_root=cfg.data.data_root)
    return task.source_fingerprint(cfg.data.train_split or "train")


def check_evaluation_inputs(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Read and tokenise every split the run will be scored on after training
    (``TrainConfig.evaluation_splits``) before the first step.

    Why: an evaluation split that cannot be scored (empty, a prompt longer than
    ``--max-length``, a malformed row, a missing file) would otherwise stop the run only after
    all of its training. The tokenised splits stay in the in-process cache
    (``tasks.dataset``), so the evaluation after training does not tokenise them again.
    """
    splits = cfg.evaluation_splits()
    check_distinct_dirs([name for name, _ in splits], "--eval-tasks")
    for name, split in splits:
        task_inputs(
            get_task(name, data_root=cfg.data.data_root),
            split,
            tokenizer,
            cfg.data.max_length,
            scoring=cfg.data.scoring_spec,
            cache_dir=cfg.data.cache_dir,
        )


def build_adapter(
    cfg: TrainConfig, method: Method, base_model: nn.Module, accelerator: Accelerator
) -> nn.Module:
    """The method's adapter on the base model, initialised identically on every process; the
    global RNG is then reseeded per process so that weight noise is independent."""
    from accelerate.utils import set_seed

    set_seed(cfg.loop.seed)  # identical adapter initialisation on every process
    try:
        model = method.build(base_model, cfg)
    except ValueError as exc:  # PEFT: no module matches --target-modules, unsupported layer
        refuse_adapter(exc, f"a {cfg.method} adapter", cfg.base.model, cfg.lora.target_modules)
    set_seed(cfg.loop.seed + accelerator.process_index)  # independent noise per process
    _warn_unmatched_targets(cfg, model)
    return model


def _warn_unmatched_targets(cfg: TrainConfig, model: nn.Module) -> None:
    """Warn when an entry of ``--target-modules`` adapted nothing (``LoraSettings.unmatched``):
    a warning, not an error, since a list written for several model families is legitimate."""
    adapted = getattr(getattr(model, "base_model", None), "targeted_module_names", None)
    if not adapted:
        return
    missing = cfg.lora.unmatched(list(adapted))
    if missing:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in adapted})
        warnings.warn(
            f"--target-modules {','.join(missing)} matched no module of {cfg.base.model}; "
            f"adapted: {','.join(kinds)} ({len(adapted)} modules)",
            UserWarning,
            stacklevel=2,
        )


def training_loader(cfg: TrainConfig, inputs: TaskInputs, accelerator: Accelerator) -> DataLoader:
    """The seeded, resumable data order, sharded over processes by Accelerate."""
    dataset = inputs.dataset
    # Items carry their dataset index so the prefix cache can look their features up.
    collator = IndexedCollator(inputs.collator)
    indexed = IndexedDataset(dataset)
    # The loader gets its own generator: creating an iterator draws a seed from it, and drawing
    # from the global RNG instead would shift the weight-noise stream after a resume.
    loader_rng = torch.Generator().manual_seed(cfg.loop.seed)
    _warn_layout_dependence(cfg, accelerator.num_processes)
    if cfg.data.bucket_by_length:
        batch_sampler = length_bucketed_sampler(
            dataset.lengths,
            cfg.loop.batch_size,
            seed=cfg.loop.seed,
            # on any number of processes: Accelerate's sharding needs it on several, and one
            # order for every process count keeps a resume on another count exact
            short_last=True,
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


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch of the training loader and of its batch order. Why not
    ``loader.set_epoch`` alone: on several processes Accelerate wraps a batch sampler in its
    ``BatchSamplerShard`` and passes the epoch only to a ``sampler`` below it, not to a batch
    sampler that orders its batches by epoch itself (``--bucket-by-length``'s), so every
    epoch repeated epoch 0's batches."""
    loader.set_epoch(epoch)
    inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


def _warn_layout_dependence(cfg: TrainConfig, world_size: int) -> None:
    """Warn where a run's steps depend on how its global batch is laid out, which the README's
    "N processes at batch b = 1 process at batch N·b" does not cover: ``--bucket-by-length``
    forms its batches at the per-process batch size. (The rows Accelerate adds to an epoch's
    last batches when the training set is not a multiple of processes x batch count for
    nothing in the loss: ``training.even_batches``.)"""
    if cfg.data.bucket_by_length and (world_size > 1 or cfg.loop.grad_accum > 1):
        warnings.warn(
            "--bucket-by-length forms batches of --batch-size per process: which examples "
            "share a step depends on the processes, --batch-size and --grad-accum, not on the "
            "global batch alone (another layout trains on other steps)",
            UserWarning,
            stacklevel=2,
        )


def plan_steps(
    cfg: TrainConfig, loader: DataLoader, n_train: int, accelerator: Accelerator
) -> StepPlan:
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
    return StepPlan(micro_per_epoch, steps_per_epoch, total_steps, global_batch, schedule)
