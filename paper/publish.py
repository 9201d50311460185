"""Copy an experiment's results of record from ``paper/out/`` (git-ignored) into the
repository, with their provenance.

Copies the tables (Markdown, CSV), ``compare.json`` (every run's metrics and its train/eval
seconds), the combined reliability diagrams, and per run its settings, training log, summary,
and per evaluation ``metrics.json`` and gzipped ``predictions.jsonl``; writes PROVENANCE.md with
the command, git revision, date, machine and a seconds-per-run table, and CRITERION.md: the
reproduction criterion checked on the runs finished so far (``--criterion``: issue 6's, BLoB vs
`lora` and `map`, the default; ``issue19``: the learning regime's, BLoB vs `lora` on 5 of 6
tasks and every OOD row; ``paper/criterion.py``);
and SUMMARY.md: one compact table (mean ACC / ECE / NLL over the seeds finished, per task and
method) with optional reference columns, the table results/README.md quotes. Re-running
replaces the destination, so a table grown over several sittings is published the same way
each time.

    .venv/bin/python paper/publish.py paper/paper_tables.yaml results/paper_tables \
        --reference paper/paper_reference.yaml
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import criterion  # paper/criterion.py: a sibling, on sys.path when run as paper/publish.py
from blob_lora.comparison import load_spec
from blob_lora.utils.atomic import atomic_write_bytes, atomic_write_text
from summary import read_reference, render_summary

TOP_FILES = ("compare.json", "results_id.md", "results_ood.md", "results_id.csv", "results_ood.csv")
RUN_FILES = ("run_config.json", "summary.json", "train_log.jsonl")
#: written by people, not by this script: a table's reading and its log of events
KEPT_FILES = ("README.md",)


def fresh_destination(dest: Path) -> None:
    """Empty ``dest`` for a new publication but keep ``KEPT_FILES``.

    Everything else there is generated from the runs, so it is rebuilt from nothing (a run
    withdrawn from the table must not linger); the hand-written reading beside it is not.
    """
    kept = {name: (dest / name).read_bytes() for name in KEPT_FILES if (dest / name).is_file()}
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name, data in kept.items():
        (dest / name).write_bytes(data)


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    """The machine line, from the same helper the benchmarks record (bench/common.py)."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from common import machine_info

    m = machine_info(torch.device("cpu"))
    return (
        f"{m['cpu_count']} CPU cores ({m['cpu_model']}), no GPU used; Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}"
    )


def copy_run(run: Path, dest: Path) -> None:
    for name in RUN_FILES:
        if (run / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / name, dest / name)
    for metrics in sorted(run.glob("eval*/*/metrics.json")):
        target = dest / metrics.parent.relative_to(run)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(metrics, target / "metrics.json")
        preds = metrics.parent / "predictions.jsonl"
        if preds.is_file():
            atomic_write_bytes(
                target / "predictions.jsonl.gz", gzip.compress(preds.read_bytes(), mtime=0)
            )


def finished_runs(compare: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs to copy: only finished ones, so the record never holds a half-trained folder that
    the next sitting will overwrite (its progress is in ``paper/out/``, not in git)."""
    return [r for r in compare.get("runs", []) if r["status"] == "done"]


def seconds_table(compare: dict[str, Any]) -> str:
    lines = ["| run | status | train s | evaluations: seconds |", "|---|---|---|---|"]
    for r in compare.get("runs", []):
        evals = "; ".join(
            f"{col}@{task} {s:.0f}"
            for col, per_task in (r.get("eval_seconds") or {}).items()
            for task, s in per_task.items()
        )
        train = r.get("train_seconds")
        train_s = f"{train:.0f}" if isinstance(train, int | float) else "–"
        lines.append(f"| {r['dir']} | {r['status']} | {train_s} | {evals or '–'} |")
    return "\n".join(lines)


def shown(path: Path) -> str:
    """``path`` as PROVENANCE.md names it: as given when relative, else relative to the
    checkout holding this script (publishing from another worktree into this one), else its
    name. Never an absolute path of the machine that published."""
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
    except ValueError:
        return path.name


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, help="the experiment file that was run")
    p.add_argument("dest", type=Path, help="destination folder in the repository")
    p.add_argument(
        "--reference",
        type=Path,
        help="YAML {column title: {task or ood:<task>: cell text}} of figures to quote beside "
        "ours in SUMMARY.md (paper/paper_reference.yaml: the paper's)",
    )
    p.add_argument(
        "--criterion",
        choices=sorted(criterion.RULES),
        default="issue6",
        help="the criterion CRITERION.md checks (paper/criterion.py RULES; default: issue6)",
    )
    args = p.parse_args(argv)
    spec = load_spec(args.config)
    reference = read_reference(args.reference) if args.reference else None
    if not (spec.out / "compare.json").is_file():
        raise SystemExit(f"{spec.out}/compare.json not found: run blob-lora compare first")
    fresh_destination(args.dest)
    for name in TOP_FILES:
        if (spec.out / name).is_file():
            shutil.copy2(spec.out / name, args.dest / name)
    for png in sorted(spec.out.glob("reliability_*.png")):
        shutil.copy2(png, args.dest / png.name)
    compare = json.loads((spec.out / "compare.json").read_text(encoding="utf-8"))
    finished = finished_runs(compare)
    for r in finished:
        if (spec.out / r["dir"]).is_dir():
            copy_run(spec.out / r["dir"], args.dest / r["dir"])
    ref_flag = f" --reference {shown(args.reference)}" if args.reference else ""
    if args.criterion != "issue6":
        ref_flag += f" --criterion {args.criterion}"
    done = len(finished)
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--", "src") else ""
    text = f"""# Provenance of {shown(args.dest)}

* Command (repository root):
  `OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/blob-lora compare --config {shown(args.config)}`
  (resumable: the same command continues an unfinished table), then
  `.venv/bin/python paper/publish.py {shown(args.config)} {shown(args.dest)}{ref_flag}`.
* Git revision of the code: `{_git("rev-parse", "HEAD")}`{dirty}.
* Published: {dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")};
  runs finished: {done} of {len(compare.get("runs", []))}.
* Machine: {_machine()}.
* Data: `$BLOB_LORA_DATA` (offline copies of the datasets, see its README.md and verify.py).
* On a new machine (`{shown(spec.out)}` is not in git), first put these runs back, so the
  table continues instead of training them again:
  `.venv/bin/python paper/restore.py {shown(args.config)} {shown(args.dest)}`.

## Seconds per run (wall clock, as recorded in summary.json / metrics.json)

{seconds_table(compare)}
"""
    atomic_write_text(args.dest / "PROVENANCE.md", text)
    ref_note = f" (reference columns: `{args.reference}`)" if reference else ""
    rule = criterion.RULES[args.criterion]
    versus = [(rule.candidate, baseline) for baseline in rule.baselines]
    summary = (
        f"# {spec.name}: summary\n\nMean ACC % / ECE % / NLL over the seeds finished "
        f"(`(n/N)`: only n of the N seeds; `–`: none yet){ref_note}. `vs` columns (the "
        "criterion's pairs): accuracy difference in points, ECE ratio, NLL difference, where "
        "both have finished the same seeds. Mean ± std, Brier and the best cells: "
        "`results_id.md`, `results_ood.md`.\n\n"
        + render_summary(compare, reference=reference, versus=versus)
    )
    atomic_write_text(args.dest / "SUMMARY.md", summary)
    verdict = criterion.check_rule(compare, args.criterion)
    atomic_write_text(args.dest / "CRITERION.md", criterion.render_markdown(verdict))
    print(
        f"published {done} finished runs of {spec.name} to {args.dest}; "
        f"criterion: {verdict.outcome} ({verdict.passed} pass, {verdict.pending} pending)"
    )


if __name__ == "__main__":
    main()
