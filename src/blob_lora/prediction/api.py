"""Predict with a fine-tuned model: an answer per question, and how far to trust it.

Typical use::

    from blob_lora.prediction import Predictor, predict

    rows = predict(model, tokenizer, [{"question": "2+2?", "choices": ["3", "4"]}])
    rows[0]["answer"], rows[0]["confidence"], rows[0]["epistemic"]

    predictor = Predictor.from_run("runs/demo/blob", mode="prefix-early")
    predictor.predict_file("questions.jsonl", "predictions.jsonl")

Each row holds the predictive distribution over the question's own options (``probs``), the
chosen option (``pred`` index, ``answer`` letter, ``answer_text``), its ``confidence`` and the
uncertainty in nats: ``total`` (entropy of the averaged predictive), ``aleatoric`` (mean entropy
of the samples) and ``epistemic`` (their difference, the mutual information between answer and
weights). Methods or settings without samples (plain LoRA, N = 0) report ``total`` only.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from blob_lora.methods import Method, get_method, method_of
from blob_lora.methods.mc_dropout import lora_dropout_layers
from blob_lora.methods.registry import FALLBACK
from blob_lora.prediction.fast import MODES, EarlyStop
from blob_lora.prediction.inputs import Questions, parse_questions, read_questions
from blob_lora.prediction.loop import DatasetPredictive, predict_dataset
from blob_lora.prediction.outputs import check_output_path, write_rows
from blob_lora.tasks import EncodedDataset, MCCollator, MCExample, Scoring, scoring_option_ids
from blob_lora.tasks.dataset import encode_split, length_sorted_batches, naming_the_file
from blob_lora.tasks.scoring import LETTER
from blob_lora.training.saved_run import load_run
from blob_lora.tuners.blob.config import EVAL_NOISE_MODES
from blob_lora.utils.caller import outside_stacklevel
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.rng import forked_rng

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


#: the seed of the weight samples of a prediction, and of an evaluation made after training
#: (``evaluation.EVAL_SEED``): the same numbers at every call unless the caller says otherwise
PREDICT_SEED = 0


@dataclass
class PredictionSummary:
    """What a prediction run did: the mode actually used, samples, time, accuracy if labelled."""

    n_examples: int
    mode: str
    eval_samples: int
    mean_samples_used: float
    seconds: float
    n_truncated: int
    n_labelled: int = 0
    accuracy: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


def check_mean_request(mode: str, n_samples: int | None, fold: int | None) -> None:
    """``ConfigError`` when ``mode`` ``mean`` (one pass with the mean weights, N = 0) comes
    with samples or a fold, which it would drop without a word."""
    if mode == "mean" and (n_samples or fold is not None):
        given = f"n_samples (--eval-samples) {n_samples}" if n_samples else f"fold (--fold) {fold}"
        raise ConfigError(
            f"mode 'mean' is one pass with the mean weights (N = 0); {given} contradicts it: "
            "drop it, or choose another mode"
        )


def _resolve_method(method: Method | str | None, model: nn.Module) -> Method:
    if method is not None:
        return get_method(method) if isinstance(method, str) else method
    found = method_of(model)
    if found.name == FALLBACK and lora_dropout_layers(model):
        # an MC-dropout model carries nothing a LoRA model trained with dropout does not
        warnings.warn(
            "no method given and the model's LoRA layers have dropout: predicting as plain "
            "LoRA (dropout off, one deterministic pass); for MC dropout's samples pass "
            "method='mc-dropout', or open the run with Predictor.from_run",
            UserWarning,
            stacklevel=outside_stacklevel(),
        )
    return found


class Predictor:
    """A model, its tokenizer and method, and how to compute the predictive.

    Args:
        model: the fine-tuned model (a ``PeftModel``; BLoB, LoRA, MC-dropout, ...).
        tokenizer: its (fast) tokenizer.
        method: a ``Method`` or its name; ``None`` asks the registered methods which one the
            model belongs to (``methods.method_of``: BLoB, an ensemble, else plain LoRA, with
            a warning where its LoRA layers have dropout: an MC-dropout model cannot be told
            from LoRA trained with dropout, so pass ``"mc-dropout"`` for its samples).
        n_samples: weight samples N (``None``: the method's default, BLoB 10; 0: mean weights).
        mode: ``fold`` (default), ``prefix``, ``early``, ``prefix-early`` or ``mean`` (see
            ``blob_lora.prediction.fast``); a mode the method cannot run falls back, with a
            warning, and the summary's ``mode`` says what ran. An ensemble has no single
            mean model: ``mean`` there is every member on its own (deterministic) weights,
            so ``n_samples`` counts the members and their spread is the epistemic part.
        fold: samples per forward pass (default: all N at once).
        batch_size: questions per batch (before samples are folded in).
        max_length: prompt tokens; passages and questions are shortened, never the options.
        early: the stopping rule of the early modes.
        seed: seeds torch's generator before predicting, so every call gives the same
            numbers (default :data:`PREDICT_SEED`, as ``blob-lora predict`` and ``evaluate``;
            ``None``: torch's generator as it stands).
        scoring: how option scores are read: a ``Scoring`` or a mode's name (``"letter"``,
            ``"cloze"``); ``from_run`` uses the run's.
        eval_noise: BLoB's weight noise of the samples, ``sequence`` (one coherent sample per
            sequence) or ``token`` (the authors' token-wise Flipout); ``None``: the model's own
            (``BlobConfig.eval_noise``); ``from_run`` uses the run's. Other methods ignore it.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        method: Method | str | None = None,
        *,
        n_samples: int | None = None,
        mode: str = "fold",
        fold: int | None = None,
        batch_size: int = 8,
        max_length: int = 300,
        early: EarlyStop | None = None,
        seed: int | None = PREDICT_SEED,
        progress: bool = False,
        scoring: Scoring | str = LETTER,
        eval_noise: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if n_samples is not None and (not isinstance(n_samples, int) or n_samples < 0):
            raise ConfigError(f"n_samples must be an integer >= 0, got {n_samples!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if fold is not None and (not isinstance(fold, int) or fold < 1):
            raise ConfigError(f"fold must be a positive integer, got {fold!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {seed!r}")
        check_mean_request(mode, n_samples, fold)
        self.model = model
        self.tokenizer = tokenizer
        self.method = _resolve_method(method, model)
        self.n_samples = self.method.eval_samples(model, 0 if mode == "mean" else n_samples)
        #: where the method runs other than asked (said in the summary's ``note``)
        self.setting_notes: list[str] = []
        if n_samples and 0 < self.n_samples < n_samples:
            self.setting_notes.append(
                f"N = {n_samples} asked, {self.n_samples} run: the method has no more samples"
            )
        elif n_samples and self.n_samples == 0 and mode != "mean":
            self.setting_notes.append(
                f"N = {n_samples} asked, one deterministic pass run: method "
                f"{self.method.name!r} draws no samples"
            )
        elif (n_samples == 0 or mode == "mean") and self.n_samples > 0:
            self.setting_notes.append(
                f"N = 0 asked, but the method has no mean weights: its {self.n_samples} "
                "members run, each on its own weights"
            )
        self.mode = mode
        self.fold = fold
        self.batch_size = batch_size
        self.max_length = max_length
        self.early = early or EarlyStop()
        self.early.validate()
        self.seed = seed
        self.progress = progress
        self.scoring = Scoring.of(scoring)
        if eval_noise is not None and eval_noise not in EVAL_NOISE_MODES:
            raise ConfigError(f"eval_noise must be one of {EVAL_NOISE_MODES}, got {eval_noise!r}")
        self.eval_noise = eval_noise
        self.last_summary: PredictionSummary | None = None

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike[str], model: str | None = None, **kwargs: Any):
        """Load a run folder written by ``blob-lora train`` (base model + adapter + method).

        ``n_samples``, ``batch_size`` and ``max_length`` default to the run's settings.
        """
        # before the load: a request that contradicts itself fails fast
        check_mean_request(kwargs.get("mode", "fold"), kwargs.get("n_samples"), kwargs.get("fold"))
        loaded = load_run(Path(run_dir), model=model)
        cfg = loaded.config
        # mean: N = 0, whatever the run's N; a deterministic method's run may store an N
        # (a compare spec's, for every method) that the user did not ask of it here
        if kwargs.get("mode") != "mean" and loaded.method.random_predictive:
            kwargs.setdefault("n_samples", cfg.evaluation.eval_samples)
        kwargs.setdefault("batch_size", cfg.evaluation.eval_batch_size)
        kwargs.setdefault("max_length", cfg.data.max_length)
        kwargs["scoring"] = Scoring.of(
            kwargs.get("scoring", cfg.data.scoring_spec), like=cfg.data.scoring_spec
        )
        kwargs.setdefault("eval_noise", cfg.blob.eval_noise)
        return cls(loaded.model, loaded.tokenizer, loaded.method, **kwargs)

    # -----------------------------------------------------------------------------------------

    def predict(self, questions: Iterable[dict[str, Any] | MCExample] | Questions) -> list[dict]:
        """One row per question, in input order (see the module docstring for the keys)."""
        parsed = questions if isinstance(questions, Questions) else parse_questions(questions)
        return self._run(parsed)

    def predict_file(
        self,
        input_path: str | os.PathLike[str],
        output_path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
    ) -> PredictionSummary:
        """Read BYO JSONL questions, write one JSON row per question atomically (gzip under a
        ``.gz`` name). An existing ``output_path`` is refused unless ``overwrite``, and the
        questions' own file always: both are checked before any question is scored."""
        check_output_path(output_path, input_path, overwrite=overwrite)
        rows = self._run(read_questions(input_path))
        write_rows(output_path, rows)
        assert self.last_summary is not None
        return self.last_summary

    # -----------------------------------------------------------------------------------------

    def _run(self, q: Questions) -> list[dict]:
        with self.method.eval_noise(self.model, self.eval_noise):
            return self._run_questions(q)

    def _run_questions(self, q: Questions) -> list[dict]:
        # a seed of our own leaves the caller's random stream as it was (a training loop, a
        # notebook): the pass runs on a forked generator
        with forked_rng(self.model, self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            return self._score_questions(q)

    def _score_questions(self, q: Questions) -> list[dict]:
        start = time.perf_counter()
        task, examples = q.task, q.examples
        with naming_the_file(task, task.eval_split):
            enc = encode_split(task, examples, self.tokenizer, self.max_length, self.scoring)
        pad = self.tokenizer.pad_token_id
        collator = MCCollator(
            pad if pad is not None else self.tokenizer.eos_token_id, task.n_options
        )
        dataset = EncodedDataset(enc)
        scored = predict_dataset(
            self.model,
            self.method,
            dataset,
            collator,
            scoring_option_ids(self.tokenizer, task, self.scoring),
            self.n_samples,
            mode=self.mode,
            fold=self.fold,
            early=self.early,
            batches=length_sorted_batches(dataset.lengths, self.batch_size),  # less padding
            progress=self.progress,
        )
        rows = [
            _row(ex, label, task.option_letters, scored, i, enc.truncated[i])
            for i, (ex, label) in enumerate(zip(examples, q.labels, strict=True))
        ]
        self.last_summary = _summary(rows, scored, self.n_samples, enc.n_truncated, start)
        self.last_summary.note = "; ".join(n for n in (*self.setting_notes, scored.note) if n)
        return rows


def _row(
    ex: MCExample,
    label: int | None,
    letters: tuple[str, ...],
    res: DatasetPredictive,
    j: int,
    truncated: bool,
) -> dict:
    k = ex.n_options
    probs = res.probs[j, :k]
    pred = int(probs.argmax())
    row: dict[str, Any] = {
        "id": ex.id,
        "probs": [float(p) for p in probs],
        "pred": pred,
        "answer": letters[pred],
        "answer_text": ex.choices[pred],
        "confidence": float(probs[pred]),
        # + 0.0: the entropy of a certain prediction comes out as -0.0, written "-0.0"
        "total": float(res.total[j]) + 0.0,
        "aleatoric": None if res.aleatoric is None else float(res.aleatoric[j]) + 0.0,
        "epistemic": None if res.epistemic is None else float(res.epistemic[j]) + 0.0,
        "n_samples": int(res.n_used[j]),
        # the passage or question was cut to fit max_length: the answer is to a shorter text
        "truncated": truncated,
    }
    if label is not None:
        row["label"] = label
        row["correct"] = pred == label
    return row


def _summary(
    rows: list[dict], scored: DatasetPredictive, n: int, n_truncated: int, start: float
) -> PredictionSummary:
    labelled = [r for r in rows if "label" in r]
    return PredictionSummary(
        n_examples=len(rows),
        mode=scored.mode,
        eval_samples=n,
        mean_samples_used=sum(r["n_samples"] for r in rows) / max(1, len(rows)),
        seconds=round(time.perf_counter() - start, 3),
        n_truncated=n_truncated,
        n_labelled=len(labelled),
        accuracy=sum(r["correct"] for r in labelled) / len(labelled) if labelled else None,
        note=scored.note,
    )


def predict(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Iterable[dict[str, Any] | MCExample],
    method: Method | str | None = None,
    **kwargs: Any,
) -> list[dict]:
    """Predict ``questions`` (BYO records: question, choices, optional context/id/answer).

    Keyword arguments are those of :class:`Predictor` (``n_samples``, ``mode``, ``fold``,
    ``batch_size``, ``max_length``, ``early``, ``seed``).
    """
    return Predictor(model, tokenizer, method, **kwargs).predict(questions)
