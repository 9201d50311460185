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
from typing import Any

from blob_lora.evaluation.evaluate import EVAL_SEED
from blob_lora.methods import METHODS, get_method
from blob_lora.pipeline import train
from blob_lora.pipeline.evaluate_saved import evaluate_saved_run
from blob_lora.prediction import Predictor, predict
from blob_lora.tasks import Scoring
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
    scoring: Scoring | str | None = None,
    eval_noise: str | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    model: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    fold: int | None = None,
    max_length: int | None = None,
    ood_reference: str | os.PathLike[str] | None = None,
    progress: bool = False,
    seed: int | None = EVAL_SEED,
) -> dict[str, Any]:
    """Evaluate a trained run folder on ``task`` (default: its own) and return the metrics:
    ``blob-lora evaluate`` for one task, with the same settings
    (``blob_lora.pipeline.evaluate_saved``).

    Writes metrics.json, predictions.jsonl and the plots into ``out`` (default
    ``RUN/eval/<task>``, where the end-of-training evaluation is); a folder that already holds
    an evaluation is refused unless ``overwrite=True``. ``split`` is a split of that task
    (``eval``: its evaluation split, or the run's own ``eval_split`` for its own task).
    ``n_samples``, ``scoring`` (a ``Scoring`` or ``"letter"``/``"cloze"``), ``eval_noise``
    (BLoB's weight noise of the samples: ``sequence`` or the authors' ``token``),
    ``data_root``, ``batch_size`` and ``max_length`` default to the run's settings; ``model`` is
    the base model when it moved since training (or the run was trained on a model passed in
    Python); ``fold`` is samples per forward; ``ood_reference`` scores the split as OOD against
    an in-distribution evaluation folder. ``seed`` seeds the weight samples (``None``: torch's
    generator as it stands), so the same call gives the same numbers.
    """
    return evaluate_saved_run(
        load_run(run_dir, model=model),
        run_dir,
        task,
        out,
        split=split,
        n_samples=n_samples,
        scoring=scoring,
        eval_noise=eval_noise,
        data_root=data_root,
        batch_size=batch_size,
        fold=fold,
        max_length=max_length,
        ood_reference=ood_reference,
        seed=seed,
        progress=progress,
        overwrite=overwrite,
    )
