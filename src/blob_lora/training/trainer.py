"""One training run from its settings to a trained adapter: ``prepare_training`` builds it
(``training.setup``) and its loop (``training.loop``), ``run_training`` runs the loop, saves the
adapter and hands the pipeline the run's summary so far.

This is training only: which method to train, evaluating the result and writing
``summary.json`` belong to ``blob_lora.pipeline``, which calls :func:`run_training`. What one
step optimises, under DDP, accumulation, length chunks and FSDP2, is documented in
``training.loop``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from blob_lora.methods.base import Method, StepSchedule
from blob_lora.models import check_model_pair
from blob_lora.models.forward import check_cloze_support
from blob_lora.tasks import Task, TaskInputs
from blob_lora.training.config import TrainConfig
from blob_lora.training.distributed import (
    check_curve_launch,
    check_fsdp_method,
    check_fsdp_settings,
    check_launch,
    on_main,
    uses_fsdp,
    warn_ineffective_precision,
)
from blob_lora.training.loop import LearningCurve, TrainingLoop
from blob_lora.training.optim import build_updater
from blob_lora.training.run_dir import ADAPTER_DIR, CHECKPOINTS, check_run_dir, prepare_run_dir
from blob_lora.training.setup import (
    build_adapter,
    build_model,
    check_evaluation_inputs,
    enable_gradient_checkpointing,
    plan_steps,
    prepare_for_accelerate,
    training_inputs,
    training_loader,
)
from blob_lora.utils.atomic import atomic_directory
from blob_lora.utils.dtensor import full_tensors
from blob_lora.utils.errors import CheckpointError, ConfigError
from blob_lora.utils.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


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

    def __post_init__(self) -> None:
        check_model_pair(self.base_model, self.tokenizer)


@dataclass
class TrainedRun:
    """What the loop hands the pipeline: the run's summary so far and what evaluation needs."""

    summary: dict[str, Any]
    model: nn.Module  # the trained PeftModel, unwrapped from any DDP wrapper
    tokenizer: PreTrainedTokenizerBase
    task: Task
    accelerator: Accelerator


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
    #: ``utils.fingerprint.model_fingerprint`` of the base model before the adapter went on:
    #: recorded in summary.json, so that reloading the run on other weights is noticed
    base_fingerprint: str
    #: the mixed precision the steps run in ("no" where a requested fp16 has no autocast)
    precision: str


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
    precision = warn_ineffective_precision(accelerator)
    check_fsdp_settings(accelerator, cfg.base.load_in_4bit, cfg.base.load_in_8bit)
    check_fsdp_method(accelerator, method.name, method.fsdp_refusal)
    check_curve_launch(accelerator, cfg.evaluation.curve_every)
    # Refuse a wrong --out before the slow loads; create the folder only after them.
    config = cfg.to_dict()
    on_main(accelerator, lambda: check_run_dir(out, config, overwrite=overwrite, resume=resume))

    if base_model is None:
        base_model, tokenizer = build_model(cfg)
    base_fingerprint = model_fingerprint(base_model)
    if cfg.data.scoring_spec.is_cloze:
        check_cloze_support(base_model)
    task, train_split, inputs = training_inputs(cfg, tokenizer, accelerator)
    check_evaluation_inputs(cfg, tokenizer)
    model = build_adapter(cfg, method, base_model, accelerator)
    if cfg.loop.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    loader = training_loader(cfg, inputs, accelerator)
    plan = plan_steps(cfg, loader, len(inputs.dataset), accelerator)
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
    model = prepare_for_accelerate(accelerator, model, updater)
    unwrapped = accelerator.unwrap_model(model)

    # Everything that reads user input has run: only now is the run folder created.
    def claim() -> tuple[bool, bool]:
        continued = prepare_run_dir(out, config, overwrite=overwrite, resume=resume)
        return continued, continued and has_checkpoint(out)

    continued, resuming = on_main(accelerator, claim)
    if continued and not resuming:  # killed before its first checkpoint, or checkpoints removed
        accelerator.print(
            f"--resume: {out} holds no checkpoint yet; training from step 0", file=sys.stderr
        )
    held_out = curve(cfg, unwrapped, method, task, tokenizer, accelerator, out) if curve else None
    loop = TrainingLoop(
        cfg, method, accelerator, model, updater, loader, inputs.option_ids, plan, held_out
    )
    return PreparedTraining(
        loop, task, train_split, inputs, tokenizer, accelerator, unwrapped, resuming,
        base_fingerprint, precision,
    )  # fmt: skip


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
    save_adapter(accelerator, unwrapped, Path(cfg.out), method)
    summary: dict[str, Any] = {
        "method": cfg.method,
        "task": task.name,
        "train_split": prepared.train_split,
        "n_train": len(inputs.dataset),
        "train_data": loop.train_data,
        "base_model": prepared.base_fingerprint,
        "steps": loop.step,
        "steps_per_epoch": loop.plan.steps_per_epoch,
        "kl_cycle": loop.plan.schedule.cycle if method.has_kl else None,
        "world_size": accelerator.num_processes,
        "fsdp": uses_fsdp(accelerator),
        "mixed_precision": prepared.precision,
        "train_seconds": round(train_seconds, 3),
        "seconds_per_step": round(train_seconds / max(1, loop.step), 4),
        # blocks whose output was computed once per example and reused (0: none)
        "prefix_cached_blocks": loop.prefix.start if loop.prefix is not None else 0,
        **method.training_summary(unwrapped, cfg, loop.schedule),
        "evaluations": {},
    }
    return TrainedRun(summary, unwrapped, prepared.tokenizer, task, accelerator)


def save_adapter(accelerator: Accelerator, model: nn.Module, out: Path, method: Method) -> None:
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


def has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).glob("step-*"))
