"""``blob-lora compare``: the paper's baselines against BLoB in one harness, as tables."""

from __future__ import annotations

import argparse

from blob_lora.cli.registry import command


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


@command(
    "compare",
    "train and evaluate methods x tasks x seeds (incl. the OOD protocol) and write "
    "mean ± std tables (Markdown, CSV) and reliability diagrams; re-runs skip finished runs",
)(_configure)
def run(args: argparse.Namespace) -> int:
    from blob_lora.comparison import load_spec, run_compare

    spec = load_spec(args.config, out=args.out)
    if args.data_root:
        spec.train["data_root"] = args.data_root
    result = run_compare(
        spec,
        collect_only=args.collect_only,
        dry_run=args.dry_run,
        progress=not args.no_progress,
    )
    if not args.dry_run:
        print(
            f"tables: {spec.out / 'results_id.md'}"
            + (f", {spec.out / 'results_ood.md'}" if spec.ood else "")
        )
    for line in result.get("failed", []):
        print(f"failed: {line}")
    return 1 if result.get("failed") else 0
