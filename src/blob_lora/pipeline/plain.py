"""A plain run: the training loop, then evaluation on the run's tasks, then summary.json.

Why here and not in the loop: evaluation and the held-out learning curve score the model with
``blob_lora.evaluation``, which the training floor must not import; the loop hands back the
trained model (``TrainedRun``) and takes the curve as a factory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from blob_lora.evaluation.curve import CURVE_FILE, HeldOutCurve
from blob_lora.methods.base import Method
from blob_lora.pipeline.evaluate import evaluate_run_tasks
from blob_lora.tasks import Task, task_inputs
from blob_lora.training.config import TrainConfig
from blob_lora.training.distributed import on_main
from blob_lora.training.run_dir import SUMMARY
from blob_lora.training.trainer import RunStart, run_training
from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import BlobLoraError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


def train_plain(cfg: TrainConfig, method: Method, start: RunStart) -> dict[str, Any]:
    """Train ``method`` with the loop, evaluate it (``cfg.evaluation.evaluate``), write summary.json.

    summary.json is written last, so a folder holding it is a finished run (``compare`` and a
    composite method's ``--resume`` rely on that).
    """
    trained = run_training(cfg, method, start, curve=held_out_curve)
    summary = trained.summary
    if cfg.evaluation.evaluate:
        summary["evaluations"] = evaluate_run_tasks(
            trained.model,
            method,
            trained.tokenizer,
            cfg,
            accelerator=trained.accelerator,
            progress=start.progress,
            loaded_task=trained.task,
        )
    out = Path(cfg.out)

    def write_summary() -> None:
        try:
            atomic_write_json(out / SUMMARY, summary)
        except OSError as exc:
            raise BlobLoraError(f"could not write {out / SUMMARY}: {exc}") from exc

    on_main(trained.accelerator, write_summary)
    if cfg.loop.log_with:
        trained.accelerator.end_training()
    return summary


def held_out_curve(
    cfg: TrainConfig,
    model: nn.Module,
    method: Method,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator,
    out: Path,
) -> HeldOutCurve | None:
    """The learning-curve scorer of ``--curve-every``, or ``None``. One process only: the
    trainer refuses more (``training.distributed.check_curve_launch``) before the folder."""
    if not cfg.evaluation.curve_every:
        return None
    inputs = task_inputs(
        task,
        cfg.evaluation.curve_split,
        tokenizer,
        cfg.data.max_length,
        scoring=cfg.data.scoring_spec,
        cache_dir=cfg.data.cache_dir,
        device=accelerator.device,
    )
    requested = (
        cfg.evaluation.curve_samples
        if cfg.evaluation.curve_samples is not None
        else cfg.evaluation.eval_samples
    )
    n = method.eval_samples(model, requested)
    return HeldOutCurve(
        model,
        method,
        inputs,
        n,
        cfg.evaluation.eval_batch_size,
        out / CURVE_FILE,
        prefix_cache=cfg.base.prefix_cache,
    )
