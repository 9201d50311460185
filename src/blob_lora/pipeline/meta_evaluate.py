"""``blob-lora meta-evaluate``: a meta-trained run adapted to each held-out task's k-shot
support set and scored on that task's other questions.

Per held-out task (the run's own split, re-created from its ``meta_config.json``): the support
set and the evaluation questions are drawn by the run's seed, the task posterior is adapted on
the support set (ABMLL's ``inner_steps`` SGD steps from the global parameters, seeded), and the
N-sample predictive of the posterior is scored with the project's metrics (ACC, ECE, NLL,
Brier). ``meta_eval.json`` holds each task's metrics and their unweighted mean over tasks.
The baselines of ``meta_baselines.py`` go through the same steps with their own adaptation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blob_lora.methods.abmll import AbmllMethod
from blob_lora.methods.base import Method
from blob_lora.methods.lora import LoraMethod
from blob_lora.metrics.calibration import classification_metrics
from blob_lora.models.loading import load_model_and_tokenizer
from blob_lora.pipeline.meta_baselines import Adaptation, baseline_adaptation, check_baseline
from blob_lora.pipeline.meta_config import MetaConfig
from blob_lora.pipeline.meta_data import TaskInputsFactory, load_split
from blob_lora.pipeline.meta_train import ADAPTER_DIR, device_of_choice
from blob_lora.prediction.loop import predict_dataset
from blob_lora.tasks.collection import TaskPool, task_seed
from blob_lora.tasks.scoring import Scoring
from blob_lora.tuners.abmll import AbmllConfig, adapt, load_abmll_model, task_posterior
from blob_lora.tuners.abmll.meta import Batch, Nll
from blob_lora.utils.atomic import atomic_write_json

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
) -> dict[str, Any]:
    """Adapt the run's global parameters (or, with ``baseline``, the pretrained model: see
    ``meta_baselines.py``) to every held-out task and score it; writes and returns
    ``{"tasks": {name: metrics}, "mean": {metric: value}, ...}`` as ``meta_eval.json``
    (``meta_eval_<baseline>.json``). ``out`` defaults to the run folder; ``model`` /
    ``tokenizer`` replace loading the run's base model (tests)."""
    run = Path(run)
    cfg = MetaConfig.load(run)
    budget = AbmllConfig.load(run / ADAPTER_DIR)
    if baseline is not None:
        check_baseline(baseline)  # before the slow loads
    split = load_split(cfg)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype)
    device = device_of_choice()
    method: Method
    if baseline is None:
        peft_model = load_abmll_model(model.to(device), run / ADAPTER_DIR)
        method = AbmllMethod()
        n_samples = method.eval_samples(peft_model, eval_samples)
        adaptation = abmll_adaptation(peft_model)
    else:
        method, n_samples = LoraMethod(), 0
        adaptation = baseline_adaptation(baseline, model.to(device), cfg, budget)
    inputs = TaskInputsFactory(
        tokenizer, cfg.max_length, cfg.batch_size, Scoring(cfg.scoring), device
    )
    per_task = {
        pool.name: evaluate_task(adaptation, method, pool, cfg, inputs, n_samples)
        for pool in split.test
    }
    mean = {k: sum(m[k] for m in per_task.values()) / len(per_task) for k in AVERAGED}
    result = {
        "method": baseline or cfg.method,
        "tasks": per_task,
        "mean": mean,
        "eval_samples": n_samples,
        "k_shot": cfg.k_shot,
        "seed": cfg.seed,
    }
    name = META_EVAL_FILE if baseline is None else f"meta_eval_{baseline}.json"
    atomic_write_json(Path(out or run) / name, result)
    return result


def abmll_adaptation(model: nn.Module) -> Adaptation:
    """ABMLL's: the task posterior adapted on the support set from the global parameters
    (seeded), installed while the model predicts."""

    @contextmanager
    def adapted(support: Sequence[Batch], nll: Nll, seed: int) -> Iterator[nn.Module]:
        posterior = adapt(model, support, nll, seed=seed)
        model.eval()
        with task_posterior(model, posterior):
            yield model

    return adapted


def evaluate_task(
    adaptation: Adaptation,
    method: Method,
    pool: TaskPool,
    cfg: MetaConfig,
    inputs: TaskInputsFactory,
    n_samples: int,
) -> dict[str, float]:
    """One held-out task: adapt on its support set, score its evaluation questions.
    Deterministic given the run's seed (the adaptation's and the predictive's draws)."""
    seed = task_seed(cfg.seed, pool.name)
    support, questions = pool.draw(cfg.k_shot, cfg.eval_size, seed)
    with adaptation(inputs.batches(pool, support), inputs.nll(pool), seed) as model:
        torch.manual_seed(seed)  # the predictive's weight samples
        pred = predict_dataset(
            model,
            method,
            inputs.dataset(pool, questions),
            inputs.collator(pool),
            inputs.option_ids(pool),
            n_samples,
            cfg.batch_size,
        )
    return classification_metrics(pred.probs, pred.labels)
