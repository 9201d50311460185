"""Held-out metrics during training: the learning curve of a run (``--curve-every``).

Every ``curve_every`` optimiser steps (and after the last) the model is scored on a held-out
split of the *training* data (``--curve-split``, e.g. ``train[:500]`` with the run trained on
``train[500:]``), never on the evaluation split, so the curve can be used to choose steps and
learning rates. The evaluation runs under a forked RNG seeded with the step, so it takes no
random numbers from training's stream: a run with a curve learns the same adapter as one
without (to float rounding: the evaluations may shift memory alignment and with it the last bit
of some CPU kernels) and resumes identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blob_lora.methods import Method
from blob_lora.metrics import classification_metrics
from blob_lora.models.prefix_cache import PrefixFeatureCache
from blob_lora.prediction.loop import predict_dataset
from blob_lora.tasks import TaskInputs

CURVE_FILE = "curve.jsonl"


class HeldOutCurve:
    """Scores one held-out split repeatedly; its frozen-prefix features are computed once."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        inputs: TaskInputs,
        n_samples: int,
        batch_size: int,
        path: Path,
        prefix_cache: bool = True,
    ) -> None:
        self.method = method
        self.inputs = inputs
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.path = path
        self.cache = None
        if prefix_cache and method.prefix_cacheable:
            self.cache = PrefixFeatureCache.for_dataset(model, inputs.dataset)

    def record(self, model: nn.Module, step: int, epoch: int) -> dict[str, Any]:
        """Score the split at ``step``, append a line to ``curve.jsonl`` and return it."""
        was_training = model.training
        device = next(model.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step)
            scored = predict_dataset(
                model,
                self.method,
                self.inputs.dataset,
                self.inputs.collator,
                self.inputs.option_ids,
                self.n_samples,
                self.batch_size,
                feature_cache=self.cache,
            )
        model.train(was_training)
        assert scored.sample_probs is not None  # fold: every batch drew the same N
        # scored as evaluation scores fold: from the float32 per-sample probabilities
        m = classification_metrics(scored.sample_probs.float().mean(0), scored.labels)
        row = {
            "step": step,
            "epoch": epoch,
            "accuracy": m["accuracy"],
            "nll": m["nll"],
            "ece": m["ece"],
            "brier": m["brier"],
            "n_examples": m["n_examples"],
            "eval_samples": self.n_samples,
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row
