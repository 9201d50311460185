"""Evaluation metrics on predicted probabilities: calibration, uncertainty, OOD, selective
prediction, plots and per-example records.

Pure functions on tensors (numpy arrays and lists are accepted too), independent of models and
data loading, so they can be tested on hand-made numbers and reused on saved predictions.
"""

from blob_lora.metrics.calibration import N_BINS, calibration_bins, classification_metrics
from blob_lora.metrics.ood import ood_detection_metrics, ood_roc_curve
from blob_lora.metrics.plots import (
    ood_roc_plot,
    reliability_diagram,
    reliability_diagram_multi,
    risk_coverage_plot,
)
from blob_lora.metrics.records import per_example_records
from blob_lora.metrics.selective import risk_coverage
from blob_lora.metrics.uncertainty import decompose_uncertainty, entropy

__all__ = [
    "N_BINS",
    "calibration_bins",
    "classification_metrics",
    "decompose_uncertainty",
    "entropy",
    "ood_detection_metrics",
    "ood_roc_curve",
    "ood_roc_plot",
    "per_example_records",
    "reliability_diagram",
    "reliability_diagram_multi",
    "risk_coverage",
    "risk_coverage_plot",
]
