"""One compact table of a comparison, next to reference figures: what a README quotes.

The full tables (``blob_lora.comparison.tables``) give one block per metric with mean ± std,
which is right for a record but too wide to read against the paper's "ACC / ECE / NLL" cells.
This renders one row per task (in-distribution, then the out-of-distribution evaluations of the
OOD training task), one column per method with the *mean over the seeds finished*, and optional
reference columns (e.g. the paper's LLaMA-2-7B figures). Generating it, rather than copying
numbers into a README by hand, keeps the quoted table in step with ``compare.json`` as seeds
are added.

    .venv/bin/python paper/summary.py results/paper_tables/compare.json --methods lora blob \
        --reference paper/paper_reference.yaml
    .venv/bin/python paper/summary.py results/regime_tables/compare.json \
        --methods lora blob blob-mean --versus blob lora
    .venv/bin/python paper/summary.py results/regime_tables/compare.json --metric ece

``--metric`` turns the table round for many methods: one row per method, one column per task,
one number per cell (the mean over the seeds finished), the best full cell of each column in
bold. Nine methods' "ACC / ECE / NLL" triples side by side are too wide to read; one metric
at a time shows where each method wins.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from blob_lora.comparison.tables import METRICS, MISSING, build_table, table_json

# (metric key in compare.json's tables, decimals) of the "ACC / ECE / NLL" cell.
CELL_METRICS = (("accuracy", 1), ("ece", 1), ("nll", 3))


def _means(table: Mapping[str, Any], task: str, method: str) -> tuple[list[float], int] | None:
    """The cell's means (ACC, ECE, NLL) and its number of seeds; None while any is missing."""
    means, n = [], 0
    for key, _ in CELL_METRICS:
        entry = table.get(key, {}).get(task, {}).get(method)
        if not entry or entry.get("mean") is None:
            return None
        means.append(float(entry["mean"]))
        n = entry["n"]
    return means, n


def _versus_cell(table: Mapping[str, Any], task: str, candidate: str, baseline: str) -> str:
    """``ACC difference (points) / ECE ratio / NLL difference``, candidate against baseline.

    Only where both have finished the same number of seeds: a ratio of means over different
    seeds mixes the seed-to-seed spread (several ECE points) into the comparison. The seeds
    themselves are the same ones in a table that runs seeds in order; ``--seeds`` makes sure.
    """
    cand, base = _means(table, task, candidate), _means(table, task, baseline)
    if cand is None or base is None or cand[1] != base[1]:
        return MISSING
    (acc_c, ece_c, nll_c), (acc_b, ece_b, nll_b) = cand[0], base[0]
    ratio = f"{ece_c / ece_b:.2f}" if ece_b > 0 else MISSING
    return f"{acc_c - acc_b:+.1f} / {ratio} / {nll_c - nll_b:+.3f}"


def _cell(table: Mapping[str, Any], task: str, method: str, n_seeds: int) -> str:
    found = _means(table, task, method)
    if found is None:
        return MISSING
    means, n = found
    text = " / ".join(f"{v:.{d}f}" for v, (_, d) in zip(means, CELL_METRICS, strict=True))
    return text if n >= n_seeds else f"{text} ({n}/{n_seeds})"


def summary_rows(compare: Mapping[str, Any]) -> list[tuple[str, str, str, Mapping[str, Any]]]:
    """``(row key, label, task, table)`` per row: ID tasks, then the OOD evaluations.

    The key is the task for in-distribution rows and ``ood:<task>`` for out-of-distribution
    ones (the same task is in both, with different numbers); OOD rows skip the training task.
    """
    rows = []
    if "id" in compare:
        rows += [(t, t, t, compare["id"]["table"]) for t in compare["id"]["tasks"]]
    ood = compare.get("ood")
    if ood:
        train_task = compare["spec"]["ood"]["train_task"]
        rows += [
            (f"ood:{t}", f"{t} (OOD from {train_task})", t, ood["table"])
            for t in ood["tasks"]
            if t != train_task
        ]
    return rows


def restrict_seeds(compare: Mapping[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """``compare`` with its tables rebuilt from the runs of ``seeds`` only.

    Baselines that have finished fewer seeds than the others must be compared on the same
    seeds (seed-to-seed spread is several ECE points); the per-run metrics in ``runs`` hold
    everything needed, so this needs no run folder.
    """
    keep = set(seeds)
    spec = compare["spec"]
    methods = list(spec["methods"])
    out: dict[str, Any] = {**compare, "spec": {**spec, "seeds": sorted(keep)}}
    settings = {"id": lambda run_task, task: run_task == task}
    if compare.get("ood"):
        train_task = spec["ood"]["train_task"]
        settings["ood"] = lambda run_task, task: run_task == train_task
    for setting, trained_for in settings.items():
        tasks = compare[setting]["tasks"]
        values: dict[str, dict[str, dict[str, list[float]]]] = {m.key: {} for m in METRICS}
        for run in sorted(compare["runs"], key=lambda r: r["seed"]):
            if run["seed"] not in keep:
                continue
            for column, by_task in run["evaluations"].items():
                for task, metrics in by_task.items():
                    if task not in tasks or not trained_for(run["task"], task):
                        continue
                    for metric in METRICS:
                        values[metric.key].setdefault(task, {}).setdefault(column, []).append(
                            float(metrics[metric.key])
                        )
        table = build_table(values, methods, tasks, len(keep))
        out[setting] = {"tasks": tasks, "table": table_json(table)}
    return out


def render_summary(
    compare: Mapping[str, Any],
    methods: Sequence[str] | None = None,
    reference: Mapping[str, Mapping[str, str]] | None = None,
    versus: Sequence[tuple[str, str]] = (),
) -> str:
    """Markdown table: rows = tasks, cells = mean ACC % / ECE % / NLL over the seeds finished.

    ``versus`` adds a column per ``(candidate, baseline)`` pair: the candidate's accuracy
    difference in points, its ECE over the baseline's (the paper's effect is a ratio of about
    1/3) and its NLL difference, from the same means the cells show.

    ``reference`` maps a column title to ``{row key: cell text}`` (row keys: the task, or
    ``ood:<task>``, see :func:`summary_rows`); rows it lacks show ``–``.
    A method cell with fewer seeds than the experiment lists carries ``(n/N)``.
    """
    methods = list(methods or compare["spec"]["methods"])
    reference = reference or {}
    n_seeds = len(compare["spec"]["seeds"])
    header = ["task", *methods, *(f"{c} vs {b}: ΔACC / ECE ratio / ΔNLL" for c, b in versus)]
    header += list(reference)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, task, table in summary_rows(compare):
        cells = [_cell(table, task, m, n_seeds) for m in methods]
        cells += [_versus_cell(table, task, c, b) for c, b in versus]
        cells += [str(ref.get(key, MISSING)) for ref in reference.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_metric(
    compare: Mapping[str, Any], metric: str, methods: Sequence[str] | None = None
) -> str:
    """Markdown table of one metric: rows = methods, columns = tasks (in-distribution, then
    ``OOD <task>``), cells = the mean over the seeds finished, printed as the compact table
    prints it. The best of each column among the cells with every seed in is in bold (a mean
    over fewer seeds is not ranked against the others: it carries ``(n/N)``)."""
    decimals = dict(CELL_METRICS)
    if metric not in decimals:
        raise ValueError(f"metric must be one of {sorted(decimals)}, got {metric!r}")
    higher = next(m.higher_is_better for m in METRICS if m.key == metric)
    methods = list(methods or compare["spec"]["methods"])
    n_seeds = len(compare["spec"]["seeds"])
    columns = [
        (key if key == task else f"OOD {task}", task, table)
        for key, _, task, table in summary_rows(compare)
    ]
    cells: dict[str, list[str]] = {m: [] for m in methods}
    for _, task, table in columns:
        by_method = {m: table.get(metric, {}).get(task, {}).get(m) or {} for m in methods}
        shown = {
            m: round(float(e["mean"]), decimals[metric])
            for m, e in by_method.items()
            if e.get("mean") is not None
        }
        full = [v for m, v in shown.items() if by_method[m]["n"] >= n_seeds]
        best = (max(full) if higher else min(full)) if full else None
        for m in methods:
            if m not in shown:
                cells[m].append(MISSING)
                continue
            text = f"{shown[m]:.{decimals[metric]}f}"
            n = by_method[m]["n"]
            if n < n_seeds:
                text += f" ({n}/{n_seeds})"
            elif shown[m] == best:
                text = f"**{text}**"
            cells[m].append(text)
    header = ["method", *(label for label, _, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [f"| {m} | " + " | ".join(cells[m]) + " |" for m in methods]
    return "\n".join(lines) + "\n"


def read_reference(path: Path) -> dict[str, dict[str, str]]:
    """Reference columns from YAML ``{column title: {row key: cell text}}``."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"{path}: cannot read reference figures: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SystemExit(f"{path}: expected {{column title: {{task: cell text}}}}")
    return data


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table for a ``compare.json``: how the READMEs' quoted tables are made."""
    p = argparse.ArgumentParser(description="Compact ACC / ECE / NLL table of a compare.json")
    p.add_argument("compare", type=Path, help="compare.json of a finished or partial table")
    p.add_argument("--methods", nargs="+", help="columns, in order (default: every method)")
    p.add_argument("--reference", type=Path, help="YAML of reference columns")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: all finished)")
    p.add_argument(
        "--versus",
        nargs=2,
        action="append",
        default=[],
        metavar=("CANDIDATE", "BASELINE"),
        help="add a column: the candidate's ACC difference, ECE ratio and NLL difference "
        "against the baseline (repeatable)",
    )
    p.add_argument(
        "--metric",
        choices=[key for key, _ in CELL_METRICS],
        help="one metric instead: a row per method, a column per task, best in bold",
    )
    args = p.parse_args(argv)
    compare = json.loads(args.compare.read_text(encoding="utf-8"))
    if args.seeds:
        compare = restrict_seeds(compare, args.seeds)
    if args.metric:
        if args.reference or args.versus:
            p.error("--metric takes no --reference or --versus columns")
        print(render_metric(compare, args.metric, args.methods), end="")
        return
    reference = read_reference(args.reference) if args.reference else None
    versus = [tuple(pair) for pair in args.versus]
    print(render_summary(compare, args.methods, reference, versus), end="")


if __name__ == "__main__":
    main()
