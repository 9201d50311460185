"""Evaluate a fine-tuned model on a task: averaged predictive, metrics, per-example rows, plots."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from blob_lora.metrics import (
    classification_metrics,
    decompose_uncertainty,
    per_example_records,
    reliability_diagram,
)
from blob_lora.models.prefix_cache import PrefixFeatureCache
from blob_lora.prediction import reports
from blob_lora.prediction.fast import predict_dataset_fast
from blob_lora.tasks import MCCollator, MCDataset, Scoring, Task, TaskInputs, task_inputs
from blob_lora.tasks.dataset import IndexedCollator, IndexedDataset
from blob_lora.tasks.scoring import LETTER
from blob_lora.tuners.blob import blob_layers
from blob_lora.tuners.blob import eval_noise as blob_eval_noise
from blob_lora.utils.atomic import atomic_write_json, atomic_write_text

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
RELIABILITY_FILE = "reliability.png"


@torch.no_grad()
def predict_dataset(
    model: torch.nn.Module,
    method: Any,
    dataset: MCDataset,
    collator: MCCollator,
    option_ids: torch.Tensor | None,
    n_samples: int,
    batch_size: int = 8,
    fold: int | None = None,
    accelerator: Any = None,
    progress: bool = False,
    prefix_cache: bool = False,
    cache_dir: str | None = None,
    feature_cache: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample_probs (S,N,C), labels (N,), indices (N,)) over the whole dataset, nothing dropped.

    Under several processes each one scores its shard and ``gather_for_metrics`` removes the
    duplicates that even sharding pads in, so every example counts exactly once. With
    ``prefix_cache`` (one process, a method that allows it) the frozen blocks below the
    adapters run once per example, shared through ``cache_dir`` with other runs on the split;
    a caller that scores the same split repeatedly passes its own ``feature_cache`` (a
    ``PrefixFeatureCache`` for this dataset) to keep the features between calls.
    """
    from tqdm.auto import tqdm

    indexed = IndexedDataset(dataset)
    loader = DataLoader(
        indexed, batch_size=batch_size, shuffle=False, collate_fn=IndexedCollator(collator)
    )
    device = next(model.parameters()).device
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    all_probs, all_labels, all_idx = [], [], []
    cache = feature_cache
    single = accelerator is None or accelerator.num_processes == 1
    if cache is None and prefix_cache and single and getattr(method, "prefix_cacheable", True):
        cache = PrefixFeatureCache.for_dataset(model, dataset, cache_dir)
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        idx = batch.pop("index")
        batch = {k: v.to(device) for k, v in batch.items()}
        with cache.injected(model, batch, idx) if cache is not None else nullcontext():
            probs = method.predict_samples(model, batch, option_ids, n_samples, fold=fold)
        probs = probs.transpose(0, 1).contiguous()  # (B, S, C) so gathering splits on examples
        labels = batch["labels"]
        if accelerator is not None:
            probs, labels, idx = accelerator.gather_for_metrics((probs, labels, idx.to(device)))
        all_probs.append(probs.float().cpu())
        all_labels.append(labels.cpu())
        all_idx.append(idx.cpu())
    if cache is not None:
        cache.save()
    probs = torch.cat(all_probs).transpose(0, 1)
    labels, idx = torch.cat(all_labels), torch.cat(all_idx)
    order = torch.argsort(idx)
    return probs[:, order], labels[order], idx[order]


def evaluate_on_task(
    model: torch.nn.Module,
    method: Any,
    tokenizer: Any,
    task: Task,
    out_dir: Path,
    *,
    split: str = "eval",
    n_samples: int | None = None,
    max_length: int = 300,
    batch_size: int = 8,
    fold: int | None = None,
    accelerator: Any = None,
    cache_dir: str | None = None,
    progress: bool = False,
    extra: dict[str, Any] | None = None,
    predictive: str = "fold",
    early: Any = None,
    ood_against: Any = None,
    prefix_cache: bool = True,
    scoring: Scoring = LETTER,
    eval_noise: str | None = None,
) -> dict[str, Any]:
    """Score ``task``'s ``split`` and write metrics.json, predictions.jsonl, reliability.png
    and risk_coverage.png (selective prediction: ``aurc``, ``acc_at_80/90/95`` in the metrics).

    ``predictive`` picks how the N-sample predictive is computed (``blob_lora.prediction.fast``:
    ``fold`` default, ``prefix``, ``early``, ``prefix-early``, ``mean``; ``early`` is its
    ``EarlyStop`` rule). ``ood_against`` (the in-distribution evaluation folder, its
    predictions.jsonl, or its rows) treats this split as OOD and adds ood.json + ood_roc.png.
    ``prefix_cache`` (``fold`` mode) reuses the frozen blocks' output per example
    (``blob_lora.models.prefix_cache``): the same predictive, 2-3x cheaper. ``scoring`` says
    how option scores are read (letter or cloze, ``blob_lora.tasks.scoring.Scoring``).
    ``eval_noise`` (``sequence`` or ``token``; ``None``: the model's own) is BLoB's weight noise
    of the N samples (``blob_lora.tuners.blob.eval_noise``); the metrics name it for models
    that sample BLoB weights.
    """
    start = time.perf_counter()
    # read the ID reference first: a wrong path fails before the (long) evaluation
    id_rows = reports.read_predictions(ood_against) if ood_against is not None else None
    n = method.eval_samples(model, n_samples)
    inputs = task_inputs(task, split, tokenizer, max_length, scoring=scoring, cache_dir=cache_dir)
    with blob_eval_noise(model, eval_noise):
        scored = _score_split(
            model,
            method,
            inputs,
            n,
            batch_size,
            fold,
            accelerator,
            progress,
            predictive=predictive,
            early=early,
            prefix_cache=prefix_cache,
            cache_dir=cache_dir,
        )
        noise = _noise_used(model, n)
    metrics = _split_metrics(scored, inputs.dataset, predictive)
    metrics.update(
        {
            "task": task.name,
            "split": split if split not in ("eval", "train") else getattr(task, f"{split}_split"),
            "method": method.name,
            "eval_samples": n,
            "scoring": scoring.describe(),
            "n_truncated": inputs.dataset.n_truncated,
            "mean_total_uncertainty": float(scored.uncertainty["total"].mean()),
            "mean_epistemic_uncertainty": float(scored.uncertainty["epistemic"].mean())
            if "epistemic" in scored.uncertainty
            else 0.0,
            "eval_seconds": round(time.perf_counter() - start, 3),
            **({"eval_noise": noise} if noise is not None else {}),
            **(extra or {}),
        }
    )
    if accelerator is None or accelerator.is_main_process:
        title = f"{method.name} on {task.name} (N={n})"
        rows = _write_rows_and_plots(scored, inputs.dataset, n, out_dir, title)
        if id_rows is not None:
            ood = reports.ood_detection(
                id_rows,
                rows,
                out_dir,
                title=f"{title}: OOD vs ID",
                id_name=ood_against if isinstance(ood_against, str | Path) else None,
            )
            metrics.update(reports.flat_ood_metrics(ood))
        atomic_write_json(out_dir / METRICS_FILE, metrics)
    return metrics


def _noise_used(model: torch.nn.Module, n: int) -> str | None:
    """The eval noise of BLoB weight samples (``None``: no samples, or no BLoB std)."""
    if n == 0:
        return None
    for _, layer in blob_layers(model):
        if any(a in layer.lora_A_rho for a in layer.active_adapters):
            return layer.blob_eval_noise
    return None


@dataclass
class _ScoredSplit:
    """A split's predictive: per-sample probabilities (``None`` when early stopping made them
    ragged), labels, the averaged predictive and its uncertainty decomposition."""

    sample_probs: torch.Tensor | None
    labels: torch.Tensor
    probs: torch.Tensor
    uncertainty: dict[str, torch.Tensor]
    #: mean samples drawn per example; only for the modes of ``prediction.fast``
    mean_used: float | None = None


def _score_split(
    model: torch.nn.Module,
    method: Any,
    inputs: TaskInputs,
    n: int,
    batch_size: int,
    fold: int | None,
    accelerator: Any,
    progress: bool,
    *,
    predictive: str,
    early: Any,
    prefix_cache: bool,
    cache_dir: str | None,
) -> _ScoredSplit:
    """The N-sample predictive over the whole split: ``fold`` through this module's loop (with
    the frozen-prefix cache), every other mode through ``prediction.fast``."""
    dataset, collator, option_ids = inputs.dataset, inputs.collator, inputs.option_ids
    if predictive == "fold":
        sample_probs, labels, _ = predict_dataset(
            model,
            method,
            dataset,
            collator,
            option_ids,
            n,
            batch_size,
            fold,
            accelerator,
            progress,
            prefix_cache=prefix_cache,
            cache_dir=cache_dir,
        )
        probs = sample_probs.mean(0)
        return _ScoredSplit(sample_probs, labels, probs, decompose_uncertainty(sample_probs))
    fast = predict_dataset_fast(
        model,
        method,
        dataset,
        collator,
        option_ids,
        n,
        batch_size,
        predictive,
        fold,
        early,
        accelerator,
        progress,
    )
    return _ScoredSplit(
        fast.sample_probs,
        fast.labels,
        fast.probs,
        fast.uncertainty(),
        mean_used=float(fast.n_used.double().mean()),
    )


def _split_metrics(scored: _ScoredSplit, dataset: MCDataset, predictive: str) -> dict[str, Any]:
    """ACC/ECE/NLL/Brier and the selective-prediction metrics; refuses a split not scored whole."""
    probs, labels = scored.probs, scored.labels
    metrics: dict[str, Any] = classification_metrics(probs, labels)
    if len(labels) != len(dataset):
        raise RuntimeError(f"evaluation scored {len(labels)} of {len(dataset)} examples")
    metrics.update(reports.selective_metrics(probs.max(-1).values, probs.argmax(-1) == labels))
    if scored.mean_used is not None:
        metrics.update(predictive=predictive, mean_samples_used=scored.mean_used)
    return metrics


def _write_rows_and_plots(
    scored: _ScoredSplit, dataset: MCDataset, n: int, out_dir: Path, title: str
) -> list[dict[str, Any]]:
    """predictions.jsonl, reliability.png and risk_coverage.png in ``out_dir``; return the rows."""
    probs, labels, sample_probs, uncertainty = (
        scored.probs,
        scored.labels,
        scored.sample_probs,
        scored.uncertainty,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_ok = n > 1 and sample_probs is not None and sample_probs.shape[0] > 1
    rows = per_example_records(
        probs,
        labels,
        ids=dataset.example_ids,
        sample_probs=sample_probs if samples_ok else None,
    )
    if not samples_ok and "epistemic" in uncertainty:  # early stopping: ragged samples
        for i, row in enumerate(rows):
            row.update({k: float(v[i]) for k, v in uncertainty.items()})
    atomic_write_text(out_dir / PREDICTIONS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    reliability_diagram(probs, labels, out_dir / RELIABILITY_FILE, title=title)
    epistemic = uncertainty.get("epistemic") if n > 1 else None
    reports.risk_coverage_figure(
        probs, labels, out_dir / reports.RISK_COVERAGE_FILE, epistemic, title=title
    )
    return rows


def task_dir_name(name: str) -> str:
    """A task name as a folder name (``mmlu:college_physics`` -> ``mmlu__college_physics``)."""
    return name.replace(":", "__").replace("/", "_")
