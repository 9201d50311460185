"""``blob-lora compare``: the paper's baselines against BLoB in one harness, as tables."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from blob_lora.cli.registry import command
from blob_lora.utils.errors import ConfigError

if TYPE_CHECKING:
    from blob_lora.comparison import CompareSpec


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="experiment YAML: methods, tasks, seeds, optional ood, train, method_options, "
        "task_options, eval_split_overrides (see blob_lora.comparison.spec)",
    )
    p.add_argument(
        "--out", help="output folder (default: the file's 'out' key, else runs/compare/NAME)"
    )
    p.add_argument(
        "--collect-only",
        action="store_true",
        help="train nothing: build the tables from the finished runs that exist",
    )
    p.add_argument(
        "--data-root", help="local dataset folder for every run (overrides train.data_root)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be trained/evaluated; write nothing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the runs (default 1); the others log to DIR/workers/. On a CPU "
        "two one-thread processes did 1.1-1.3x the work of one two-thread process "
        "(bench/compare_workers.py)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads of each process (default: torch's, split equally among --workers)",
    )
    p.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)  # set for the workers


@command(
    "compare",
    "train and evaluate methods x tasks x seeds (incl. the OOD protocol) and write "
    "mean ± std tables (Markdown, CSV) and reliability diagrams; re-runs skip finished runs",
)(_configure)
def run(args: argparse.Namespace) -> int:
    import torch

    from blob_lora.comparison import load_spec, run_compare
    from blob_lora.comparison.workers import (
        FAILED_DIR,
        RUNS_FAILED_STATUS,
        WORKERS_DIR,
        SharedFailures,
        die_with_parent,
        threads_per_worker,
    )

    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.worker_of is not None and not die_with_parent(args.worker_of):
        return 0  # the command that started this worker is gone already
    spec = load_spec(args.config, out=args.out)
    if args.data_root:  # for every run, over the file's data_root wherever it is set
        for options in (spec.train, *spec.method_options.values(), *spec.task_options.values()):
            options["data_root"] = args.data_root
        for variant in spec.variants.values():
            variant.pop("data_root", None)
    parallel = args.workers > 1 and not (args.dry_run or args.collect_only)
    threads = args.threads
    if parallel:
        threads = threads_per_worker(args.workers, args.threads, torch.get_num_threads())
    if threads is not None:
        torch.set_num_threads(threads)
    if parallel:
        result = _run_with_workers(args, spec, threads)
    else:
        result = run_compare(
            spec,
            collect_only=args.collect_only,
            dry_run=args.dry_run,
            progress=not args.no_progress,
            # a worker shares its failures with the command's other processes
            shared_failures=SharedFailures(spec.out / WORKERS_DIR / FAILED_DIR)
            if args.worker_of is not None
            else None,
        )
    if not args.dry_run:
        print(
            f"tables: {spec.out / 'results_id.md'}"
            + (f", {spec.out / 'results_ood.md'}" if spec.ood else "")
        )
    for line in result.get("failed", []):
        print(f"failed: {line}")
    if not result.get("failed"):
        return 0
    return RUNS_FAILED_STATUS if args.worker_of is not None else 1


def _run_with_workers(args: argparse.Namespace, spec: CompareSpec, threads: int) -> dict[str, Any]:
    """Work on the experiment here and in ``--workers`` - 1 more processes, then write the
    tables from every finished run (the workers' too)."""
    from blob_lora.comparison import run_compare
    from blob_lora.comparison.workers import (
        FAILED_DIR,
        RUNS_FAILED_STATUS,
        WORKERS_DIR,
        SharedFailures,
        Workers,
        worker_command,
    )
    from blob_lora.utils.atomic import atomic_write_json

    child = ["compare", "--config", args.config, "--no-progress", "--threads", str(threads)]
    child += ["--worker-of", str(os.getpid())]
    child += ["--out", str(args.out)] if args.out else []
    child += ["--data-root", args.data_root] if args.data_root else []
    n = args.workers - 1
    failures = SharedFailures(spec.out / WORKERS_DIR / FAILED_DIR)
    failures.clear()  # this command tries every unfinished run again, failed ones included
    with Workers([worker_command(child)] * n, threads, spec.out / WORKERS_DIR) as workers:
        print(
            f"{n} more worker(s) started, {threads} thread(s) each (this one too); "
            f"their output: {spec.out / WORKERS_DIR}/"
        )
        run_compare(spec, progress=not args.no_progress, shared_failures=failures)
        if any(code is None for code in workers.poll()):
            print("waiting for the other worker(s) to finish their runs")
    # the tables and compare.json are written once more, from every finished run, with the
    # failures of every process marked (a fresh plan alone would list them as still to train)
    result = run_compare(spec, collect_only=True, echo=lambda _: None, failed=failures.all())
    crashed = [  # a worker's failed runs are listed above; any other status is a crash
        f"a worker exited with status {code}: see {log}"
        for log, code in zip(workers.logs, workers.returncodes, strict=True)
        if code not in (0, RUNS_FAILED_STATUS)
    ]
    if crashed:
        result["failed"] = [*result.get("failed", []), *crashed]
        atomic_write_json(spec.out / "compare.json", result)
    return result
