"""Learning curves of a ``blob-lora compare`` experiment run with ``--curve-every`` (issue 19):
held-out TRAINING-example accuracy, NLL and ECE against steps, one panel row per task, one
line per method (and seed). Writes ``<out>/curves.png``, ``<out>/curves.md`` (a table per
task: the metrics at every recorded step) and ``<out>/curves.json``.

``--zero-shot DIR`` (``paper/zero_shot.py``'s output, e.g. ``results/zero_shot``) adds step 0,
the base model before any training: its predictions under the run's own scoring, restricted to
the very questions the curve scores (read from the run's final evaluation on its curve split,
``eval/<task>/predictions.jsonl``), so the first point is on the same questions as the rest.

    .venv/bin/python paper/curves.py paper/out/regime_pilot --out results/regime_pilot \
        --zero-shot results/zero_shot
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from blob_lora.metrics.calibration import classification_metrics

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


def scoring_folder(run_config: dict[str, Any]) -> str:
    """``zero_shot.py``'s folder name of a run's scoring: letter, cloze, cloze-token, cloze-char."""
    scoring = run_config.get("scoring", "letter")
    norm = run_config.get("length_norm", "none")
    return scoring if norm in (None, "none") else f"{scoring}-{norm}"


def zero_shot_row(run_dir: Path, task: str, zero_shot: Path) -> dict[str, Any] | None:
    """Step 0: the zero-shot predictions on the questions the run's curve scored, or ``None``
    when either file is missing or a question has no zero-shot prediction (never a partial
    point: a point on other questions would not be comparable)."""
    run_config = json.loads((run_dir / "run_config.json").read_text(encoding="utf-8"))
    scored = run_dir / "eval" / task / "predictions.jsonl"
    source = zero_shot / "runs" / task / scoring_folder(run_config) / "predictions.jsonl"
    if not scored.is_file() or not source.is_file():
        return None
    ids = [json.loads(line)["id"] for line in scored.read_text(encoding="utf-8").splitlines()]
    by_id = {r["id"]: r for r in map(json.loads, source.read_text(encoding="utf-8").splitlines())}
    if not ids or any(i not in by_id for i in ids):
        return None
    rows = [by_id[i] for i in ids]
    width = max(len(r["probs"]) for r in rows)
    probs = torch.tensor([r["probs"] + [0.0] * (width - len(r["probs"])) for r in rows])
    labels = torch.tensor([r["label"] for r in rows])
    metrics = classification_metrics(probs, labels)
    return {"step": 0, "zero_shot": True, **{k: float(v) for k, v in metrics.items()}}


def add_zero_shot(
    curves: dict[str, dict[str, list[dict[str, Any]]]], experiment: Path, zero_shot: Path
) -> None:
    """Prepend step 0 (:func:`zero_shot_row`) to every series that has one."""
    for task, series in curves.items():
        for name, rows in series.items():
            method, seed = name.split("/")
            row = zero_shot_row(experiment / "runs" / task / method / seed, task, zero_shot)
            if row is not None and rows[0]["step"] != 0:
                rows.insert(0, row)


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
    p.add_argument(
        "--zero-shot", type=Path, default=None, help="zero_shot.py's folder: adds step 0"
    )
    args = p.parse_args(argv)
    curves = read_curves(args.experiment)
    if not curves:
        raise SystemExit(f"no curve.jsonl under {args.experiment}/runs (run with --curve-every)")
    if args.zero_shot is not None:
        add_zero_shot(curves, args.experiment, args.zero_shot)
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
