"""Evaluate a fine-tuned model on a task: averaged predictive, metrics, per-example rows, plots."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blob_lora.methods import Method
from blob_lora.metrics import (
    classification_metrics,
    decompose_uncertainty,
    per_example_records,
    reliability_diagram,
)
from blob_lora.prediction import reports
from blob_lora.prediction.api import PREDICT_SEED
from blob_lora.prediction.fast import EarlyStop
from blob_lora.prediction.loop import predict_dataset
from blob_lora.prediction.resume import PassCheckpoint, pass_key
from blob_lora.tasks import (
    MCDataset,
    Scoring,
    Task,
    TaskInputs,
    length_sorted_batches,
    task_inputs,
)
from blob_lora.tasks.scoring import LETTER
from blob_lora.utils.atomic import atomic_write_json, atomic_write_text
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.fingerprint import tensors_fingerprint
from blob_lora.utils.json_file import read_json_object

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
RELIABILITY_FILE = "reliability.png"
#: a stopped evaluation's progress (``prediction.resume``); removed once metrics.json is written
PROGRESS_FILE = ".progress.pt"
#: the metrics' record of the N asked for (``n_samples``; ``None``: the method's default), beside
#: ``eval_samples``, the N used: ``compare`` re-scores an evaluation whose request differs from
#: its file's, which the N used cannot tell (an ensemble of 3 asked for 10 uses 3)
REQUESTED_SAMPLES = "requested_samples"
#: the seed of the weight samples of an evaluation made after training (``blob-lora evaluate``,
#: ``blob_lora.evaluate``, ``compare`` filling in a missing evaluation): ``predict``'s
EVAL_SEED = PREDICT_SEED
#: how often that progress is written (a write is a few kB to MB; a batch of N = 10 samples on
#: two CPU cores takes about a minute)
PROGRESS_EVERY_SECONDS = 30.0


def evaluate_on_task(
    model: torch.nn.Module,
    method: Method,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    out_dir: Path,
    *,
    split: str = "eval",
    n_samples: int | None = None,
    max_length: int = 300,
    batch_size: int = 8,
    fold: int | None = None,
    accelerator: Accelerator | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
    extra: dict[str, Any] | None = None,
    predictive: str = "fold",
    early: EarlyStop | None = None,
    ood_against: str | Path | reports.Rows | None = None,
    prefix_cache: bool = True,
    scoring: Scoring = LETTER,
    eval_noise: str | None = None,
    by_length: bool = True,
    resume: bool = True,
    seed: int | None = None,
    keep_finished: bool = False,
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
    ``eval_noise`` (BLoB: ``sequence`` or ``token``; ``None``: the model's own) is the weight
    noise of the N samples (``Method.eval_noise``); the metrics name it when samples are drawn
    with such noise. ``by_length`` (one process) scores the split in batches of similar length
    (``tasks.length_sorted_batches``: sequential batches carry 1.3-2.2x the real tokens on the
    regime table's splits; measured 0.76-0.80x the time on ARC-C, bench/README.md); the results
    come back in split order either way, and only which weight sample meets which question
    differs. With ``resume`` (one process) the pass keeps its progress in
    ``out_dir/.progress.pt`` and an evaluation stopped part-way goes on from there, with the
    same result (``prediction.resume``); its ``eval_seconds`` then counts the earlier
    sittings too (up to their last kept batch: what a stop cut off is redone, and counted, here).
    ``seed`` (recorded as ``eval_seed``) seeds torch's generator before the pass, so the weight
    samples and dropout masks, and so the metrics, are the same at every call
    (``blob-lora evaluate`` passes :data:`EVAL_SEED` unless told otherwise, a composite run its
    own seed); ``None`` draws from the generator as it stands (a plain run's evaluation after
    training, which continues the training's seeded stream).

    ``keep_finished``: an evaluation already finished in ``out_dir`` is never written over. If
    it was made with this very call (the same weights, data and settings: its recorded
    ``evaluation_key``), its metrics are returned as they are, so a stopped multi-task
    evaluation goes on where it stopped; otherwise ``ConfigError`` says so before any scoring.
    Without it (training, ``compare``) the folder is the caller's to write.
    """
    start = time.perf_counter()
    # read the ID reference first: a wrong path fails before the (long) evaluation
    id_rows = reports.read_predictions(ood_against) if ood_against is not None else None
    n = method.eval_samples(model, n_samples)
    inputs = task_inputs(task, split, tokenizer, max_length, scoring=scoring, cache_dir=cache_dir)
    posterior = _posterior_key(method, model)  # one digest of a posterior, for both keys
    evaluation_key = None
    if keep_finished:
        evaluation_key = pass_key(
            model,
            {
                "method": method.name,
                "split": split,
                "data": inputs.dataset.digest,
                "n": n,
                "scoring": scoring.describe(),
                "eval_noise": eval_noise,
                "seed": seed,
                "mode": predictive,
                "fold": fold,
                "early": early,
                "batch_size": batch_size,
                "by_length": by_length,
                "prefix_cache": prefix_cache,
                "ood": str(ood_against) if isinstance(ood_against, str | Path) else None,
                **posterior,
            },
        )
        finished = _finished_evaluation(out_dir, evaluation_key)
        if finished is not None:
            return finished
    if seed is not None:  # each process its own stream, as in training
        torch.manual_seed(seed + (accelerator.process_index if accelerator is not None else 0))
    with method.eval_noise(model, eval_noise) as noise:
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
            by_length=by_length,
            progress_file=out_dir / PROGRESS_FILE if resume else None,
            key_settings={
                "method": method.name,
                "split": split,
                "noise": noise,
                "scoring": scoring.describe(),
                "prefix_cache": prefix_cache,
                **({"seed": seed} if seed is not None else {}),
                **posterior,
            },
        )
    metrics = _split_metrics(scored, inputs.dataset, predictive)
    metrics.update(
        {
            "task": task.name,
            "split": split if split not in ("eval", "train") else getattr(task, f"{split}_split"),
            "method": method.name,
            "eval_samples": n,
            REQUESTED_SAMPLES: n_samples,
            "scoring": scoring.describe(),
            # the data scored (file digest or Hub name): compare re-scores a run when it changes
            "data": task.source_fingerprint(split),
            "n_truncated": inputs.dataset.n_truncated,
            "mean_total_uncertainty": float(scored.uncertainty["total"].mean()),
            "mean_epistemic_uncertainty": float(scored.uncertainty["epistemic"].mean())
            if "epistemic" in scored.uncertainty
            else 0.0,
            "eval_seconds": round(scored.seconds_before + time.perf_counter() - start, 3),
            **({"eval_noise": noise} if noise is not None and n > 0 else {}),
            **({"eval_seed": seed} if seed is not None else {}),
            **({"evaluation_key": evaluation_key} if evaluation_key is not None else {}),
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
        (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    return metrics


def _finished_evaluation(out_dir: Path, key: str) -> dict[str, Any] | None:
    """The metrics finished in ``out_dir`` by the same evaluation (``key``); ``None`` when
    none is there; ``ConfigError`` when another evaluation is (see ``keep_finished``)."""
    path = out_dir / METRICS_FILE
    if not path.exists():
        return None
    stored = read_json_object(path, ConfigError)
    if stored.get("evaluation_key") == key:
        return stored
    raise ConfigError(
        f"{out_dir} already holds another evaluation ({METRICS_FILE}; a run's own eval/ "
        "folders hold the one made at the end of training): write to another folder "
        "(--out / out=) to keep it, or pass --overwrite / overwrite=True to replace it"
    )


def _posterior_key(method: Method, model: torch.nn.Module) -> dict[str, str]:
    """``{"posterior": digest}`` of a posterior the model carries beside its weights
    (Laplace, SWAG), so that saved progress of one posterior is not taken for another's with
    the same mean weights; ``{}`` for the others (their keys stay as they were)."""
    tensors = method.posterior_tensors(model)
    return {"posterior": tensors_fingerprint(tensors)} if tensors else {}


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
    #: wall seconds of the earlier sittings of a resumed pass (their batches are not redone)
    seconds_before: float = 0.0


def _score_split(
    model: torch.nn.Module,
    method: Method,
    inputs: TaskInputs,
    n: int,
    batch_size: int,
    fold: int | None,
    accelerator: Accelerator | None,
    progress: bool,
    *,
    predictive: str,
    early: EarlyStop | None,
    prefix_cache: bool,
    cache_dir: str | None,
    by_length: bool,
    progress_file: Path | None = None,
    key_settings: dict[str, Any] | None = None,
) -> _ScoredSplit:
    """The N-sample predictive over the whole split, through prediction's dataset loop.

    ``fold``, the reference, is scored from the float32 per-sample probabilities (its metrics
    always were); the other modes report the loop's own predictive and samples used. Batches
    of similar length when ``by_length`` and one process, with or without an ``accelerator``
    (sharding over processes is Accelerate's, in split order). With a ``progress_file`` (one
    process) the pass is checkpointed there, keyed by the model's weights, ``key_settings``
    and the pass's own.
    """
    if accelerator is not None and accelerator.num_processes == 1:
        # one process: the split is this pass's to order, as in evaluate and predict, so a run's
        # end-of-training evaluation meets the batches (and a seeded one the samples) they do
        accelerator = None
    batches = None
    if by_length and accelerator is None:
        batches = length_sorted_batches(inputs.dataset.lengths, batch_size)
    checkpoint = None
    if progress_file is not None and (accelerator is None or accelerator.num_processes == 1):
        settings = {
            **(key_settings or {}),
            "data": inputs.dataset.digest,
            "n": n,
            "mode": predictive,
            "fold": fold,
            "early": early,
            "batch_size": batch_size,
            "batches": batches,
        }
        key = pass_key(model, settings)
        checkpoint = PassCheckpoint(progress_file, key, every_seconds=PROGRESS_EVERY_SECONDS)
    scored = predict_dataset(
        model,
        method,
        inputs.dataset,
        inputs.collator,
        inputs.option_ids,
        n,
        batch_size,
        mode=predictive,
        fold=fold,
        early=early,
        accelerator=accelerator,
        progress=progress,
        desc="evaluate",
        prefix_cache=prefix_cache,
        cache_dir=cache_dir,
        batches=batches,
        checkpoint=checkpoint,
    )
    before = checkpoint.seconds_before if checkpoint is not None else 0.0
    if predictive == "fold":
        assert scored.sample_probs is not None  # every batch drew the same N
        sample_probs = scored.sample_probs.float()
        uncertainty = decompose_uncertainty(sample_probs)
        return _ScoredSplit(
            sample_probs, scored.labels, sample_probs.mean(0), uncertainty, seconds_before=before
        )
    return _ScoredSplit(
        scored.sample_probs,
        scored.labels,
        scored.probs,
        scored.uncertainty(),
        mean_used=float(scored.n_used.double().mean()),
        seconds_before=before,
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
