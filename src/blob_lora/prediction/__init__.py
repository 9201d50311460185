"""Prediction you can act on: answers with a calibrated predictive and its uncertainty split.

* ``loop``: :func:`predict_dataset`, the one loop over a dataset that every predictive mode,
  evaluation, the learning curve and ``Predictor`` run.
* ``fast``: the predictive of one batch in each mode (``fold``, ``prefix``, ``early``,
  ``prefix-early``, ``mean``), each measured in ``bench/predictive.py``.
* :func:`predict` / :class:`Predictor` (``api``): questions in, one row per question out
  (predictive over the options, answer, confidence, total / aleatoric / epistemic uncertainty).
* ``resume``: a long pass's saved progress (``PassCheckpoint``), so a stopped evaluation goes on
  from its last saved batch to the uninterrupted pass's result.
* ``reports``: selective prediction (AURC, accuracy at 80/90/95 % coverage) and OOD detection
  (AUROC/AUPR per uncertainty score) from prediction rows.
"""

from blob_lora.prediction.api import PredictionSummary, Predictor, predict
from blob_lora.prediction.fast import MODES, EarlyStop
from blob_lora.prediction.inputs import parse_questions, read_questions
from blob_lora.prediction.loop import DatasetPredictive, predict_dataset
from blob_lora.prediction.reports import ood_detection, selective_metrics, uncertainty_scores

__all__ = [
    "MODES",
    "DatasetPredictive",
    "EarlyStop",
    "PredictionSummary",
    "Predictor",
    "ood_detection",
    "parse_questions",
    "predict",
    "predict_dataset",
    "read_questions",
    "selective_metrics",
    "uncertainty_scores",
]
