"""The Python API in one place: train a run, evaluate it, predict with it.

Everything here is importable from ``blob_lora`` itself (``blob_lora.train``, ...), lazily, so
``import blob_lora`` stays as light as the adapter alone.

    import blob_lora

    cfg = blob_lora.TrainConfig(task="arc_easy", method="blob", scoring="cloze", out="runs/x")
    summary = blob_lora.train(cfg)                       # run folder: adapter, logs, metrics
    metrics = blob_lora.evaluate("runs/x", task="openbookqa")
    rows = blob_lora.Predictor.from_run("runs/x").predict(questions)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from blob_lora.evaluation.evaluate import EVAL_SEED, evaluate_on_task
from blob_lora.methods import METHODS, get_method
from blob_lora.pipeline import train
from blob_lora.prediction import Predictor, predict
from blob_lora.tasks import Scoring, get_task
from blob_lora.tasks.dir_names import task_dir_name
from blob_lora.training.config import TrainConfig
from blob_lora.training.saved_run import LoadedRun, load_run

__all__ = [
    "METHODS",
    "LoadedRun",
    "Predictor",
    "Scoring",
    "TrainConfig",
    "evaluate",
    "get_method",
    "load_run",
    "predict",
    "train",
]


def evaluate(
    run_dir: str | os.PathLike[str],
    task: str | None = None,
    *,
    split: str = "eval",
    n_samples: int | None = None,
    scoring: Scoring | None = None,
    eval_noise: str | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = False,
    seed: int | None = EVAL_SEED,
) -> dict[str, Any]:
    """Evaluate a trained run folder on ``task`` (default: its own) and return the metrics.

    Writes metrics.json, predictions.jsonl and the plots into ``out`` (default
    ``RUN/eval/<task>``). ``split`` is a split of that task (``eval``: its evaluation split, or
    the run's own ``eval_split`` for its own task); ``n_samples``, ``scoring`` and
    ``eval_noise`` (BLoB's weight noise of the samples: ``sequence`` or the authors' ``token``)
    default to the run's settings. ``seed`` seeds the weight samples (``None``: torch's
    generator as it stands), so the same call gives the same numbers. The same as
    ``blob-lora evaluate``.
    """
    loaded = load_run(Path(run_dir))
    cfg = loaded.config
    name = task or cfg.data.task
    if split == "eval" and name == cfg.data.task and cfg.evaluation.eval_split:
        split = cfg.evaluation.eval_split
    return evaluate_on_task(
        loaded.model,
        loaded.method,
        loaded.tokenizer,
        get_task(name, data_root=cfg.data.data_root),
        Path(out) if out is not None else Path(run_dir) / "eval" / task_dir_name(name),
        split=split,
        n_samples=n_samples if n_samples is not None else cfg.evaluation.eval_samples,
        max_length=cfg.data.max_length,
        batch_size=cfg.evaluation.eval_batch_size,
        cache_dir=cfg.data.cache_dir,
        progress=progress,
        prefix_cache=cfg.base.prefix_cache,
        scoring=scoring or cfg.data.scoring_spec,
        eval_noise=eval_noise or cfg.blob.eval_noise,
        seed=seed,
    )
