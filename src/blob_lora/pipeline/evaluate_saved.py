"""A finished run folder scored again, on its own task or another: what ``blob-lora evaluate``
and ``blob_lora.evaluate`` both do, so the command line and the Python API take the same
settings, check them the same way and write to the same places.

Why a module of its own: the two entry points had drifted (the API had no ``model``,
``data_root``, ``batch_size``, ``fold``, ``max_length`` or OOD reference, and checked none of
its numbers), and both wrote over an earlier evaluation, the one made at the end of training
included, without a word. Now an evaluation already in the output folder is kept: the same
call made again returns its metrics (so a stopped multi-task evaluation goes on where it
stopped, and a stopped task from its saved progress), another one is refused unless
``overwrite`` says to replace it (``evaluation.evaluate_on_task``'s ``keep_finished``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from blob_lora.evaluation.evaluate import EVAL_SEED, evaluate_on_task
from blob_lora.tasks import Scoring, get_task
from blob_lora.tasks.dir_names import task_dir_name
from blob_lora.training.config import TrainConfig
from blob_lora.training.run_dir import EVAL_DIR
from blob_lora.training.saved_run import LoadedRun
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.rng import forked_rng


def default_eval_dir(run_dir: str | os.PathLike[str], task: str) -> Path:
    """Where an evaluation of ``task`` goes without ``out``: ``RUN/eval/<task>``, the folder
    the end-of-training evaluation of that task also uses."""
    return Path(run_dir) / EVAL_DIR / task_dir_name(task)


def _check_int(name: str, value: Any, low: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def resolve_scoring(cfg: TrainConfig, scoring: Scoring | str | None) -> Scoring:
    """The run's scoring, or the caller's: a ``Scoring``, or a mode's name, which keeps the
    run's length normalisation when it is the run's own mode (as ``--scoring`` does)."""
    if scoring is None:
        return cfg.data.scoring_spec
    return Scoring.of(scoring, like=cfg.data.scoring_spec)


def evaluate_saved_run(
    loaded: LoadedRun,
    run_dir: str | os.PathLike[str],
    task: str | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    split: str = "eval",
    n_samples: int | None = None,
    scoring: Scoring | str | None = None,
    eval_noise: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    fold: int | None = None,
    max_length: int | None = None,
    ood_reference: str | os.PathLike[str] | None = None,
    seed: int | None = EVAL_SEED,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score the loaded run on ``task`` (default: its own) into ``out`` (default
    :func:`default_eval_dir`) and return the metrics.

    ``split`` ``eval`` is the task's evaluation split, or the run's own ``eval_split`` for its
    own task. Every other setting left ``None`` is the run's (``data_root``, ``batch_size``,
    ``max_length``, ``n_samples``, ``scoring``, ``eval_noise``); ``fold`` is samples per forward
    (default all N at once); ``ood_reference`` scores the split as OOD against an
    in-distribution evaluation folder. ``seed`` seeds the weight samples (``None``: torch's
    generator as it stands).
    """
    cfg = loaded.config
    name = task or cfg.data.task
    _check_int("n_samples", n_samples, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("fold", fold, 1)
    _check_int("max_length", max_length, 1)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed must be an integer or None, got {seed!r}")
    target = Path(out) if out is not None else default_eval_dir(run_dir, name)
    resolved = resolve_scoring(cfg, scoring)
    if split == "eval" and name == cfg.data.task and cfg.evaluation.eval_split:
        split = cfg.evaluation.eval_split
    task_obj = get_task(name, data_root=data_root if data_root is not None else cfg.data.data_root)
    with forked_rng(loaded.model, seed is not None):  # the caller's stream left as it was
        return evaluate_on_task(
            loaded.model,
            loaded.method,
            loaded.tokenizer,
            task_obj,
            target,
            split=split,
            n_samples=n_samples if n_samples is not None else cfg.evaluation.eval_samples,
            max_length=max_length or cfg.data.max_length,
            batch_size=batch_size or cfg.evaluation.eval_batch_size,
            fold=fold,
            cache_dir=cfg.data.cache_dir,
            progress=progress,
            ood_against=ood_reference,
            prefix_cache=cfg.base.prefix_cache,
            scoring=resolved,
            eval_noise=eval_noise or cfg.blob.eval_noise,
            seed=seed,
            keep_finished=not overwrite,
        )
