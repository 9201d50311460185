"""Learning curves of a ``blob-lora compare`` experiment run with ``--curve-every`` (issue 19):
held-out TRAINING-example accuracy, NLL and ECE against steps, one panel row per task, one
line per method (and seed). Writes ``<out>/curves.png``, ``<out>/curves.md`` (a table per
task: the metrics at every recorded step) and ``<out>/curves.json``.

    .venv/bin/python paper/curves.py paper/out/regime_pilot --out results/regime_pilot
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

METRICS = (("accuracy", "held-out accuracy"), ("nll", "held-out NLL"), ("ece", "held-out ECE"))


def read_curves(experiment: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """task -> "method/seedN" -> curve rows, from ``<experiment>/runs/<task>/<method>/<seed>``."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(dict)
    for path in sorted((experiment / "runs").glob("*/*/*/curve.jsonl")):
        seed, method, task = (
            path.parent.name,
            path.parent.parent.name,
            path.parent.parent.parent.name,
        )
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        if rows:
            out[task][f"{method}/{seed}"] = rows
    return dict(out)


def render_table(curves: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    lines: list[str] = []
    for task, series in curves.items():
        lines += [
            f"### {task}",
            "",
            "| run | step | accuracy | NLL | ECE |",
            "|---|---|---|---|---|",
        ]
        for name, rows in series.items():
            for r in rows:
                lines.append(
                    f"| {name} | {r['step']} | {r['accuracy']:.3f} | {r['nll']:.3f} | "
                    f"{r['ece']:.3f} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(curves: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(curves)
    fig, axes = plt.subplots(
        len(tasks), len(METRICS), figsize=(4.2 * len(METRICS), 3.2 * len(tasks)), squeeze=False
    )
    for i, task in enumerate(tasks):
        for j, (key, label) in enumerate(METRICS):
            ax = axes[i][j]
            for name, rows in curves[task].items():
                ax.plot(
                    [r["step"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=name
                )
            ax.set_title(f"{task}: {label}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", type=Path, help="the compare experiment's output folder")
    p.add_argument("--out", type=Path, default=None, help="default: the experiment folder")
    args = p.parse_args(argv)
    curves = read_curves(args.experiment)
    if not curves:
        raise SystemExit(f"no curve.jsonl under {args.experiment}/runs (run with --curve-every)")
    out = args.out or args.experiment
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, out / "curves.png")
    table = render_table(curves)
    (out / "curves.md").write_text(table, encoding="utf-8")
    (out / "curves.json").write_text(json.dumps(curves, indent=1), encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
