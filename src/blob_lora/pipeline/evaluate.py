"""A run scored on its own task and on ``--eval-tasks``, into ``RUN/eval/<task>/``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blob_lora.evaluation.evaluate import evaluate_on_task
from blob_lora.methods.base import Method
from blob_lora.tasks import Task, get_task
from blob_lora.tasks.dir_names import task_dir_name
from blob_lora.training.config import TrainConfig
from blob_lora.training.run_dir import EVAL_DIR

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


def evaluate_run_tasks(
    model: torch.nn.Module,
    method: Method,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TrainConfig,
    *,
    accelerator: Accelerator | None = None,
    progress: bool = False,
    loaded_task: Task | None = None,
    seed: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate a run on its own task and ``cfg.evaluation.eval_tasks`` into ``RUN/eval/<task>/``
    (``TrainConfig.evaluation_splits``; nothing without ``--evaluate``); ``seed`` seeds each
    task's weight samples (``evaluate_on_task``).

    Shared by plain and composite runs so every method is scored the same way.
    """
    results: dict[str, dict[str, Any]] = {}
    for name, split in cfg.evaluation_splits():
        task = (
            loaded_task
            if name == cfg.data.task and loaded_task is not None
            else get_task(name, data_root=cfg.data.data_root)
        )
        results[name] = evaluate_on_task(
            model,
            method,
            tokenizer,
            task,
            Path(cfg.out) / EVAL_DIR / task_dir_name(name),
            split=split,
            n_samples=cfg.evaluation.eval_samples,
            max_length=cfg.data.max_length,
            batch_size=cfg.evaluation.eval_batch_size,
            accelerator=accelerator,
            cache_dir=cfg.data.cache_dir,
            progress=progress,
            prefix_cache=cfg.base.prefix_cache,
            scoring=cfg.data.scoring_spec,
            eval_noise=cfg.blob.eval_noise,
            seed=seed,
        )
    return results
