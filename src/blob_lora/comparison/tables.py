"""Results tables: mean ± std over seeds per method and task, best cell per column in bold.

Layout (paper style): one block per metric; rows are methods, columns are tasks. ACC and ECE
are in %, NLL and Brier in nats / raw. The std is the sample std over seeds (n − 1 in the
denominator; 0 for one seed). "Best" compares the means as printed (so printed ties are all
bold): highest ACC, lowest ECE, NLL and Brier. A cell with fewer seeds than the experiment
lists carries ``(n/N)``; a cell with none is ``–``.

The CSV is tidy, one line per (metric, task, method): ``setting, metric, task, method, mean,
std, n, best, cell`` with ``mean``/``std`` in the printed units and ``cell`` the Markdown text.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str  # in metrics.json
    label: str
    scale: float
    decimals: int
    higher_is_better: bool


METRICS = (
    Metric("accuracy", "ACC (%) ↑", 100.0, 2, True),
    Metric("ece", "ECE (%) ↓", 100.0, 2, False),
    Metric("nll", "NLL ↓", 1.0, 3, False),
    Metric("brier", "Brier ↓", 1.0, 3, False),
)
MISSING = "–"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass
class Cell:
    values: list[float]  # in printed units, one per finished seed
    n_expected: int
    decimals: int
    best: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def stats(self) -> tuple[float, float] | None:
        return mean_std(self.values) if self.values else None

    def rounded_mean(self) -> float | None:
        s = self.stats
        return None if s is None else round(s[0], self.decimals)

    def text(self) -> str:
        s = self.stats
        if s is None:
            return MISSING
        body = f"{s[0]:.{self.decimals}f} ± {s[1]:.{self.decimals}f}"
        if self.best:
            body = f"**{body}**"
        if self.n < self.n_expected:
            body += f" ({self.n}/{self.n_expected})"
        return body


def build_table(
    values: dict[str, dict[str, dict[str, list[float]]]],
    methods: Sequence[str],
    tasks: Sequence[str],
    n_seeds: int,
) -> dict[str, dict[str, dict[str, Cell]]]:
    """``values[metric_key][task][method]`` (raw metric values per seed) -> cells, best marked."""
    table: dict[str, dict[str, dict[str, Cell]]] = {}
    for metric in METRICS:
        table[metric.key] = {}
        for task in tasks:
            cells = {
                m: Cell(
                    [metric.scale * v for v in values.get(metric.key, {}).get(task, {}).get(m, [])],
                    n_seeds,
                    metric.decimals,
                )
                for m in methods
            }
            means = [c.rounded_mean() for c in cells.values() if c.values]
            if means:
                best = max(means) if metric.higher_is_better else min(means)
                for c in cells.values():
                    c.best = bool(c.values) and c.rounded_mean() == best
            table[metric.key][task] = cells
    return table


def render_markdown(
    title: str,
    note: str,
    table: dict[str, dict[str, dict[str, Cell]]],
    methods: Sequence[str],
    tasks: Sequence[str],
    task_labels: dict[str, str] | None = None,
) -> str:
    labels = task_labels or {}
    lines = [f"# {title}", "", note, ""]
    for metric in METRICS:
        lines += [f"### {metric.label}", ""]
        lines.append("| method | " + " | ".join(labels.get(t, t) for t in tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        for m in methods:
            row = [table[metric.key][t][m].text() for t in tasks]
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def render_csv(
    setting: str,
    table: dict[str, dict[str, dict[str, Cell]]],
    methods: Sequence[str],
    tasks: Sequence[str],
) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["setting", "metric", "task", "method", "mean", "std", "n", "best", "cell"])
    for metric in METRICS:
        for t in tasks:
            for m in methods:
                cell = table[metric.key][t][m]
                s = cell.stats
                mean = "" if s is None else f"{s[0]:.6g}"
                std = "" if s is None else f"{s[1]:.6g}"
                writer.writerow(
                    [setting, metric.key, t, m, mean, std, cell.n, int(cell.best), cell.text()]
                )
    return buf.getvalue()


def table_json(
    table: dict[str, dict[str, dict[str, Cell]]],
) -> dict[str, Any]:
    """Numbers of a table for compare.json (printed units)."""
    out: dict[str, Any] = {}
    for metric_key, by_task in table.items():
        out[metric_key] = {
            t: {
                m: {
                    "mean": None if c.stats is None else c.stats[0],
                    "std": None if c.stats is None else c.stats[1],
                    "n": c.n,
                    "values": c.values,
                    "best": c.best,
                }
                for m, c in cells.items()
            }
            for t, cells in by_task.items()
        }
    return out
