"""Figures for calibration, selective prediction and OOD detection.

Figures are built as bare ``matplotlib.figure.Figure`` objects with an explicit Agg canvas:
no pyplot, so nothing is registered in pyplot's global figure list (no leaks in long sweeps),
no GUI backend is ever touched on headless machines, and the process-wide backend chosen by
whoever imported matplotlib first is left alone. Each PNG is rendered to memory first and then
written atomically, so a crash mid-plot never leaves a truncated image next to the results.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from blob_lora.metrics.calibration import N_BINS, calibration_bins, classification_metrics
from blob_lora.metrics.ood import ood_detection_metrics, ood_roc_curve
from blob_lora.metrics.selective import risk_coverage
from blob_lora.utils.atomic import atomic_write_bytes

PathLike = str | os.PathLike[str]
DPI = 120


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)  # Agg rendering for this figure only; no global backend switch.
    return fig


def _save_png(fig: Figure, path: PathLike) -> Path:
    """Render ``fig`` to PNG bytes in memory, then replace ``path`` atomically."""
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _require_items(mapping: Mapping[str, Any], name: str) -> None:
    if not mapping:
        raise ValueError(f"{name}: needs at least one entry")


def _diagonal(ax: Any) -> None:
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def _finish_axes(
    ax: Any,
    xlabel: str,
    ylabel: str,
    xlim: tuple[float, float],
    ylim: tuple[float, float | None],
    legend_loc: str,
    title: str | None,
) -> None:
    """Limits, axis labels, the legend and the title of a one-axes figure."""
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc=legend_loc, fontsize=8)
    if title:
        ax.set_title(title)


def reliability_diagram(probs: Any, labels: Any, path: PathLike, title: str | None = None) -> Path:
    """Reliability diagram of top-label confidence (15 bins) with a confidence histogram.

    Blue bars are per-bin accuracy, red hatched bars the gap to the bin's mean confidence
    (above the bar: over-confident; inside it: under-confident). ECE in the legend is the
    torchmetrics value reported in tables. Returns the written path.
    """
    ece = classification_metrics(probs, labels)["ece"]
    bins = calibration_bins(probs, labels, N_BINS)
    edges = bins["edges"].tolist()
    left, width = edges[:-1], 1.0 / N_BINS
    filled = (bins["count"] > 0).tolist()
    acc = [a if f else 0.0 for a, f in zip(bins["accuracy"].tolist(), filled, strict=True)]
    conf = bins["confidence"].tolist()
    gap_lo = [min(a, c) if f else 0.0 for a, c, f in zip(acc, conf, filled, strict=True)]
    gap_h = [abs(c - a) if f else 0.0 for a, c, f in zip(acc, conf, filled, strict=True)]

    fig = _new_figure((5.0, 6.0))
    gs = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax = fig.add_subplot(gs[0])
    ax_h = fig.add_subplot(gs[1], sharex=ax)

    ax.bar(
        left,
        acc,
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        label="accuracy",
    )
    ax.bar(
        left,
        gap_h,
        bottom=gap_lo,
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        linewidth=0.5,
        label="gap",
    )
    _diagonal(ax)
    ax.plot([], [], " ", label=f"ECE = {100 * ece:.2f}%")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.tick_params(labelbottom=False)
    if title:
        ax.set_title(title)

    ax_h.bar(
        left,
        bins["count"].tolist(),
        width=width,
        align="edge",
        color="tab:gray",
        edgecolor="black",
        linewidth=0.5,
    )
    ax_h.set_xlabel("confidence")
    ax_h.set_ylabel("count")
    return _save_png(fig, path)


def reliability_diagram_multi(
    methods: Mapping[str, tuple[Any, Any]], path: PathLike, title: str | None = None
) -> Path:
    """Reliability curves of several methods on one axes, ``{name: (probs, labels)}``.

    Each method is a line through (mean confidence, accuracy) of its non-empty bins, so
    methods evaluated on the same data can be compared at a glance; ECEs go in the legend.
    """
    _require_items(methods, "methods")
    curves = []
    for name, (probs, labels) in methods.items():
        ece = classification_metrics(probs, labels)["ece"]
        bins = calibration_bins(probs, labels, N_BINS)
        keep = bins["count"] > 0
        curves.append(
            (name, ece, bins["confidence"][keep].tolist(), bins["accuracy"][keep].tolist())
        )

    fig = _new_figure((5.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    _diagonal(ax)
    for name, ece, x, y in curves:
        ax.plot(
            x, y, marker="o", markersize=4, linewidth=1.5, label=f"{name} (ECE {100 * ece:.2f}%)"
        )
    # limits just beyond [0, 1] keep the markers at 0 and 1 visible
    _finish_axes(ax, "confidence", "accuracy", (-0.02, 1.02), (-0.02, 1.02), "upper left", title)
    return _save_png(fig, path)


def risk_coverage_plot(
    curves: Mapping[str, tuple[Any, Any]], path: PathLike, title: str | None = None
) -> Path:
    """Risk-coverage curves, ``{name: (confidence, correct)}``; AURC in the legend."""
    _require_items(curves, "curves")
    data = []
    for name, (confidence, correct) in curves.items():
        rc = risk_coverage(confidence, correct)
        data.append((name, rc["aurc"], rc["coverage"].tolist(), rc["risk"].tolist()))

    fig = _new_figure((5.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for name, aurc, cov, risk in data:
        ax.plot(cov, risk, linewidth=1.5, label=f"{name} (AURC {aurc:.4f})")
    _finish_axes(ax, "coverage", "risk (error rate)", (0, 1), (0, None), "best", title)
    return _save_png(fig, path)


def ood_roc_plot(
    scores: Mapping[str, tuple[Any, Any]], path: PathLike, title: str | None = None
) -> Path:
    """ROC curves for OOD detection, ``{score_name: (id_scores, ood_scores)}``; AUROC in legend."""
    _require_items(scores, "scores")
    data = []
    for name, (id_scores, ood_scores) in scores.items():
        auroc = ood_detection_metrics(id_scores, ood_scores)["auroc"]
        fpr, tpr = ood_roc_curve(id_scores, ood_scores)
        data.append((name, auroc, fpr.tolist(), tpr.tolist()))

    fig = _new_figure((5.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="chance")
    for name, auroc, fpr, tpr in data:
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUROC {auroc:.3f})")
    _finish_axes(
        ax,
        "false positive rate (ID flagged as OOD)",
        "true positive rate (OOD detected)",
        (0, 1),
        (0, 1.01),
        "lower right",
        title,
    )
    return _save_png(fig, path)
