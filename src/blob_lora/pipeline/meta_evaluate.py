"""``blob-lora meta-evaluate``: a meta-trained run adapted to each held-out task's k-shot
support set and scored on that task's other questions.

Per held-out task (the run's own split, re-created from its ``meta_config.json``): the support
set and the evaluation questions are drawn by the run's seed, the task posterior is adapted on
the support set (ABMLL's ``inner_steps`` SGD steps from the global parameters, seeded), and the
N-sample predictive of the posterior is scored with the project's metrics (ACC, ECE, NLL,
Brier). ``meta_eval.json`` holds each task's metrics and their unweighted mean over tasks, and the
wall seconds each task's adaptation and scoring took (``task_seconds``).
The baselines of ``meta_baselines.py`` go through the same steps with their own adaptation and
predictive, into ``meta_eval_<baseline>.json``; every file records the adaptation budget.
Each task's metrics are kept on disk as soon as it is scored, so a stopped evaluation resumes
with the tasks it had not scored (``meta_progress.py``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from blob_lora.methods.abmll import AbmllMethod
from blob_lora.metrics.calibration import classification_metrics
from blob_lora.models.loading import EMBEDDED_MODELS, load_model_and_tokenizer
from blob_lora.pipeline.meta_baselines import (
    Adaptation,
    Contender,
    baseline_contender,
    check_baseline,
)
from blob_lora.pipeline.meta_config import META_CONFIG_NAME, MetaConfig
from blob_lora.pipeline.meta_data import (
    MetaRun,
    TaskInputsFactory,
    check_same_data,
    fit_split,
    load_split,
    short_pools,
)
from blob_lora.pipeline.meta_progress import ScoredTasks, folder_digest, partial_path
from blob_lora.pipeline.meta_train import (
    ADAPTER_DIR,
    TASKS_FILE,
    device_of_choice,
    holds_meta_run,
    is_finished,
)
from blob_lora.prediction.loop import predict_dataset
from blob_lora.prediction.resume import PassCheckpoint, settings_key
from blob_lora.tasks.collection import TaskPool, task_seed
from blob_lora.training.run_dir import RUN_CONFIG
from blob_lora.tuners.abmll import AbmllConfig, adapt, load_abmll_model, task_posterior
from blob_lora.tuners.abmll.config import ABMLL_CONFIG_NAME
from blob_lora.tuners.abmll.meta import Batch, Nll
from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import BlobLoraError, ConfigError, DataError
from blob_lora.utils.fingerprint import model_fingerprint
from blob_lora.utils.json_file import read_json_object

logger = logging.getLogger(__name__)

META_EVAL_FILE = "meta_eval.json"
#: the metrics averaged over tasks
AVERAGED = ("accuracy", "ece", "nll", "brier")


def meta_evaluate(
    run: str | Path,
    out: str | Path | None = None,
    *,
    eval_samples: int | None = None,
    baseline: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
    prefix_cache: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Adapt the run's global parameters (or, with ``baseline``, a baseline: see
    ``meta_baselines.py``) to every held-out task and score it; writes and returns
    ``{"tasks": {name: metrics}, "mean": {metric: value}, ...}`` as ``meta_eval.json``
    (``meta_eval_<baseline>.json``). ``out`` defaults to the run folder; ``model`` /
    ``tokenizer`` replace loading the run's base model (tests); ``progress`` shows a bar over
    the held-out tasks (and the multi-task baseline's training when it runs);
    ``prefix_cache``: the frozen blocks below the adapters run once per support batch of an
    adaptation and once per evaluation question, not once per inner step and weight sample
    (the same metrics up to float rounding). The tasks a stopped evaluation of the same run,
    contender and samples had scored are taken from its progress file and not scored again
    (``meta_progress.ScoredTasks``), which the finished evaluation removes. The result records
    its evaluation's key (``evaluation_key``: the protocol, the adapter's or the budget's
    digest, the base model, the contender, N): a file of another evaluation (another run's,
    or one made before keys were recorded) is refused unless ``overwrite`` (a file without a
    key before any model loads); the same evaluation again is scored afresh and written over
    its own."""
    if eval_samples is not None and (
        isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or eval_samples < 0
    ):
        raise ConfigError(f"--eval-samples must be an integer >= 0, got {eval_samples!r}")
    name = META_EVAL_FILE if baseline is None else f"meta_eval_{baseline}.json"
    path = Path(out or run) / name
    stored = stored_result_key(path, overwrite)  # before the slow loads
    if baseline is not None:
        check_baseline(baseline)  # before the slow loads
    meta_run, model = open_run(run, model, tokenizer, prefix_cache)
    base_model = model_fingerprint(model)  # before a contender's adapter wraps it
    if baseline is None:
        contender = abmll_contender(model, meta_run, eval_samples)
    else:
        contender = baseline_contender(
            baseline, model, meta_run, eval_samples=eval_samples, progress=progress
        )
    if eval_samples and contender.n_samples == 0:
        logger.warning(
            "--eval-samples %d ignored: %s predicts at its point estimate (N = 0)",
            eval_samples,
            baseline,
        )
    settings = {
        "protocol": meta_run.cfg.to_dict(),
        # ABMLL's result rests on the global parameters' bytes; a baseline's only on the
        # adaptation budget, so a run restored without its weights keeps a baseline's progress
        "adapter": (
            folder_digest(meta_run.folder / ADAPTER_DIR)
            if baseline is None
            else meta_run.budget.to_dict()
        ),
        "base_model": base_model,
        "contender": baseline or meta_run.cfg.method,
        "eval_samples": contender.n_samples,
        "prefix_cache": meta_run.inputs.prefix_cache,
    }
    # the result's key leaves the prefix cache out: the same metrics up to float rounding
    key = settings_key({k: v for k, v in settings.items() if k != "prefix_cache"})
    if stored is not None and stored != key and not overwrite:
        raise ConfigError(
            f"{path} already holds another evaluation (another run, baseline or "
            "--eval-samples); pass --overwrite (overwrite=True) to replace it, or choose "
            "another --out"
        )
    scored = ScoredTasks(partial_path(path), settings_key(settings))
    done = set(scored.load())
    pools = meta_run.split.test
    size = meta_run.cfg.eval_size
    short = short_pools(pools, meta_run.cfg.k_shot, size) if size is not None else {}
    if short:
        listed = ", ".join(f"{name} {n}" for name, n in short.items())
        print(
            f"note: eval_size {size} but the held-out tasks have fewer questions beyond their "
            f"support sets, all of which are scored: {listed}",
            file=sys.stderr,
        )
    if done:
        kept = sum(p.name in done for p in pools)
        print(
            f"meta-evaluate: resuming from {scored.path} ({kept} of {len(pools)} held-out "
            "tasks scored)",
            file=sys.stderr,
        )
    for pool in tqdm(pools, desc="meta-evaluate", disable=not progress):
        checkpoint = scored.pass_checkpoint(pool.name)
        if pool.name not in done:  # the checkpoint counts the task's seconds from here
            metrics = evaluate_task(contender, pool, meta_run, checkpoint=checkpoint)
            scored.add(pool.name, metrics, round(checkpoint.seconds, 3))
        checkpoint.clear()  # the task's metrics are kept; so is a kill's leftover cleared
    per_task = {pool.name: scored.tasks[pool.name] for pool in pools}
    mean = {k: sum(m[k] for m in per_task.values()) / len(per_task) for k in AVERAGED}
    cfg, budget = meta_run.cfg, meta_run.budget
    result = {
        "method": baseline or cfg.method,
        "tasks": per_task,
        "mean": mean,
        "eval_samples": contender.n_samples,
        "k_shot": cfg.k_shot,
        "seed": cfg.seed,
        "adaptation": {"steps": budget.inner_steps, "lr": budget.inner_lr},
        # wall seconds per task, whichever sitting scored it
        "task_seconds": {pool.name: scored.seconds[pool.name] for pool in pools},
        "evaluation_key": key,
    }
    held_out = {p.name for p in meta_run.split.test}
    overlong = {k: v for k, v in meta_run.split.overlong.items() if k in held_out}
    if overlong:  # --overlong drop left these out of the scored questions
        result["overlong"] = overlong
    atomic_write_json(path, result)
    scored.clear()
    return result


def stored_result_key(path: Path, overwrite: bool) -> str | None:
    """The ``evaluation_key`` a result file already at ``path`` holds (``None``: no file, or
    ``overwrite``), refusing one that cannot be written, or one that holds no key (written
    before keys were recorded, or not by meta-evaluate) unless ``overwrite``: never replace
    an evaluation that cannot be told to be this one."""
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"--out {path.parent} exists and is not a folder")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; cannot write the results there")
    if overwrite or not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    key = data.get("evaluation_key") if isinstance(data, dict) else None
    if not isinstance(key, str):
        raise ConfigError(
            f"{path} already holds results that are not known to be this evaluation's; pass "
            "--overwrite (overwrite=True) to replace them, or choose another --out"
        )
    return key


def check_run(run: Path) -> None:
    """``ConfigError`` unless ``run`` is a finished run of ``blob-lora meta-train`` (its
    protocol, its ABMLL adapter and ``tasks.json``, written last), naming what it is instead
    when that can be told: a run still training or stopped part way is refused."""
    if (
        is_finished(run)
        and (run / META_CONFIG_NAME).is_file()
        and (run / ADAPTER_DIR / ABMLL_CONFIG_NAME).is_file()
    ):
        return
    hint = "meta-evaluate takes a run folder written by 'blob-lora meta-train'"
    if (run / RUN_CONFIG).is_file():
        raise ConfigError(f"--run {run} is a single-task run of 'blob-lora train'; {hint}")
    if not is_finished(run) and holds_meta_run(run):
        raise ConfigError(
            f"--run {run}: its meta-training has not finished (stopped part way, or still "
            "running); finish it with the same 'blob-lora meta-train' command and --resume"
        )
    if (run / META_CONFIG_NAME).is_file():
        raise ConfigError(
            f"--run {run} holds no ABMLL adapter ({ADAPTER_DIR}/{ABMLL_CONFIG_NAME}); {hint}"
        )
    raise ConfigError(f"--run {run} is not a meta-learning run folder; {hint}")


def open_run(
    run: str | Path, model: Any = None, tokenizer: Any = None, prefix_cache: bool = True
) -> tuple[MetaRun, nn.Module]:
    """The run's protocol, budget, split and inputs (reusing the frozen blocks' output under
    ``prefix_cache``), and the base model on the device (``model`` / ``tokenizer`` given, or
    the run's loaded)."""
    folder = Path(run)
    check_run(folder)
    cfg = MetaConfig.load(folder)
    budget = AbmllConfig.load(folder / ADAPTER_DIR)
    hint = (
        f"relative paths in {folder / META_CONFIG_NAME} are read from the current folder: run "
        "meta-evaluate from the folder meta-train ran in"
    )
    try:
        split = load_split(cfg)
    except DataError as exc:
        if cfg.tasks.strip().lower() in ("mmlu", "paper") or Path(cfg.tasks).is_absolute():
            raise
        raise DataError(f"{exc} ({hint})") from exc
    if model is None:
        try:
            model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype)
        except (BlobLoraError, OSError) as exc:
            # a model folder named relative to another folder reads here as a missing folder
            # or a Hub name; the run cannot tell which was meant, so the hint says both
            where = Path(cfg.model).expanduser()
            if cfg.model in EMBEDDED_MODELS or where.is_absolute() or where.exists():
                raise  # nothing another folder would change: the error as it is
            raise ConfigError(
                f"the run's --model {cfg.model} could not be loaded ({exc}); if it is a "
                f"folder, {hint}"
            ) from exc
    device = device_of_choice()
    inputs = TaskInputsFactory(
        tokenizer, cfg.max_length, cfg.batch_size, cfg.scoring_spec, device, prefix_cache
    )
    split = fit_split(split, inputs, cfg)  # the pools the run was trained and split with
    recorded = read_json_object(folder / TASKS_FILE, ConfigError).get("task_data")
    check_same_data(split, recorded, folder)
    return MetaRun(folder, cfg, budget, split, inputs), model.to(device)


def abmll_contender(base: nn.Module, run: MetaRun, eval_samples: int | None) -> Contender:
    """ABMLL's: the run's global parameters on ``base``, adapted per task (``abmll_adaptation``),
    predicting with N weight samples of the task posterior (the run's default, or
    ``eval_samples``)."""
    peft_model = load_abmll_model(base, run.folder / ADAPTER_DIR)
    method = AbmllMethod()
    return Contender(
        abmll_adaptation(peft_model), method, method.eval_samples(peft_model, eval_samples)
    )


def abmll_adaptation(model: nn.Module) -> Adaptation:
    """ABMLL's adaptation: the task posterior adapted on the support set from the global
    parameters (seeded), installed while the model predicts."""

    @contextmanager
    def adapted(support: Sequence[Batch], nll: Nll, seed: int) -> Iterator[nn.Module]:
        posterior = adapt(model, support, nll, seed=seed)
        model.eval()
        with task_posterior(model, posterior):
            yield model

    return adapted


def evaluate_task(
    contender: Contender,
    pool: TaskPool,
    run: MetaRun,
    *,
    checkpoint: PassCheckpoint | None = None,
) -> dict[str, float]:
    """One held-out task: adapt on its support set, score its evaluation questions.
    Deterministic given the run's seed (the adaptation's and the predictive's draws), so a
    pass stopped part way and resumed from ``checkpoint`` (the scored batches and the random
    state after them) gives the uninterrupted pass's metrics.

    Under the inputs' ``prefix_cache`` the adaptation's NLL runs the frozen blocks once per
    support batch (``meta_data.reusing_prefix``) and the questions are scored through
    prediction's frozen-prefix cache (``predict_dataset``: when the contender's method allows
    it and its model has frozen blocks), in RAM and one batch at a time: the task's questions
    are met once, so nothing is kept or written."""
    cfg, inputs = run.cfg, run.inputs
    seed = task_seed(cfg.seed, pool.name)
    support, questions = pool.draw(cfg.k_shot, cfg.eval_size, seed)
    with contender.adaptation(inputs.batches(pool, support), inputs.nll(pool), seed) as model:
        torch.manual_seed(seed)  # the predictive's weight samples
        pred = predict_dataset(
            model,
            contender.method,
            inputs.dataset(pool, questions),
            inputs.collator(pool),
            inputs.option_ids(pool),
            contender.n_samples,
            cfg.batch_size,
            prefix_cache=inputs.prefix_cache,
            checkpoint=checkpoint,
        )
    return classification_metrics(pred.probs, pred.labels)
