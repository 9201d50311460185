"""The core sub-commands: ``train``, ``evaluate`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blob_lora.cli.options import (
    add_eval_noise_override,
    add_scoring_override,
    add_train_options,
    merge_config,
    read_config_file,
    scoring_override,
    task_names,
)
from blob_lora.cli.registry import command
from blob_lora.cli.report_lines import std_of_a_line
from blob_lora.evaluation.evaluate import EVAL_SEED
from blob_lora.tasks.dir_names import check_distinct_dirs
from blob_lora.utils.errors import BlobLoraError, ConfigError

if TYPE_CHECKING:
    from blob_lora.training.config import TrainConfig

OOD_TASKS = ["arc_challenge", "arc_easy", "mmlu:college_chemistry", "mmlu:college_physics"]


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="YAML/TOML/JSON file whose keys are these long options; the command line wins",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its last checkpoint",
    )
    p.add_argument(
        "--reuse",
        nargs="+",
        metavar="RUN",
        default=[],
        help="finished run folders a composite method (ensemble, laplace, multiswag, tfb) copies "
        "as its sub-runs where one trained exactly as the sub-run would (e.g. the LoRA run of "
        "the same settings and seed as an ensemble's member 0 under --ensemble-share-seed, or "
        "as Laplace's MAP run), instead of training them again",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_train_options(p)


@command(
    "train",
    "fine-tune a model on a task and evaluate it on the task's eval split",
    multi_process=True,
)(_configure_train)
def run_train(args: argparse.Namespace) -> int:
    from blob_lora.pipeline import train

    file_values = read_config_file(args.config) if args.config else {}
    cfg = merge_config(file_values, vars(args))
    reuse = _reusable_runs(cfg.method, args.reuse)
    _note_unread_settings(cfg, file_values, args)
    summary = train(
        cfg,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.no_progress,
        finished_runs=reuse,
    )
    print(f"run folder: {cfg.out}")
    if reuse:
        _print_reused(Path(cfg.out))
    for task, m in summary["evaluations"].items():
        print(_metrics_line(task, m))
        _print_truncation_note(task, m)
    if summary.get("std_of_A"):
        print(std_of_a_line(summary["std_of_A"]))
    return 0


def _note_unread_settings(
    cfg: TrainConfig, file_values: dict[str, Any], args: argparse.Namespace
) -> None:
    """Say which of the settings the user gave (command line or ``--config``) the method does
    not read (``training.config.unread_settings``): ``--prior-std`` with ``--method lora`` would otherwise
    be accepted and silently change nothing. A note, not a refusal: one config file may serve
    several methods. Printed once, by the main process of a multi-process launch."""
    from blob_lora.training.config import SETTINGS, unread_settings
    from blob_lora.training.distributed import launched_rank
    from blob_lora.utils.settings import flag

    given = set(file_values) | {k for k, v in vars(args).items() if k in SETTINGS and v is not None}
    unread = unread_settings(cfg.method, given)
    if unread and launched_rank() == 0:
        print(
            f"note: --method {cfg.method} does not read {', '.join(map(flag, unread))}: "
            "they change nothing in this run",
            file=sys.stderr,
        )


def _reusable_runs(method_name: str, runs: list[str]) -> list[Path]:
    """``--reuse``'s folders, refused up front where they cannot be reused: a method without
    sub-runs, a folder that is not a finished run."""
    if not runs:
        return []
    from blob_lora.methods import get_method
    from blob_lora.methods.composite import CompositeMethod

    if not isinstance(get_method(method_name), CompositeMethod):
        raise ConfigError(
            f"--reuse: method {method_name!r} trains no sub-runs to copy; only a composite "
            "method (ensemble, laplace, multiswag, tfb) does"
        )
    from blob_lora.training.run_dir import ADAPTER_DIR, SUMMARY

    paths = [Path(r) for r in runs]
    for path in paths:
        if not (path / SUMMARY).is_file() or not (path / ADAPTER_DIR).is_dir():
            raise ConfigError(
                f"--reuse: {path} is not a finished run folder (summary.json and adapter/ "
                "are written when 'blob-lora train' finishes)"
            )
    return paths


def _print_reused(out: Path) -> None:
    """Which sub-runs were copied, and from where; or that none could be."""
    from blob_lora.methods.composite import SHARED_FROM
    from blob_lora.training.run_dir import SUMMARY

    copied = []
    for summary in sorted(out.rglob(SUMMARY)):
        source = json.loads(summary.read_text(encoding="utf-8")).get(SHARED_FROM)
        if source and summary.parent != out:
            where = os.path.normpath(summary.parent / source)
            copied.append(f"{summary.parent.relative_to(out)}: copied from {where}")
    if not copied:
        print("--reuse: no run trained exactly as a sub-run would; every sub-run was trained")
    for line in copied:
        print(f"--reuse: {line}")


def _metrics_line(task: str, m: dict) -> str:
    return (
        f"{task}: acc {m['accuracy']:.3f}  ece {m['ece']:.3f}  nll {m['nll']:.3f}  "
        f"brier {m['brier']:.3f}  (n={int(m['n_examples'])}, samples={m['eval_samples']})"
    )


def _print_truncation_note(task: str, m: dict) -> None:
    """Say where prompts were cut: only ``metrics.json`` recorded it, and the scores of a cut
    prompt are not those of the whole question."""
    if m.get("n_truncated"):
        print(
            f"note: {m['n_truncated']} of {int(m['n_examples'])} prompts of {task} were longer "
            "than --max-length; their passage or question was cut (never the options): pass a "
            "larger --max-length to score them whole"
        )


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by 'blob-lora train'")
    p.add_argument(
        "--task",
        help="task(s) to evaluate, comma-separated; 'ood' = the paper's OOD protocol "
        f"({', '.join(OOD_TASKS)}); default: the run's own task",
    )
    p.add_argument(
        "--split", default="eval", help="split to evaluate (default: each task's eval split)"
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="weight samples averaged; 0 = mean weights (default: the run's)",
    )
    p.add_argument(
        "--out",
        help="output folder (default: RUN/eval/<task>); with several tasks one subfolder each",
    )
    p.add_argument(
        "--data-root",
        help="local dataset folder (default: the run's, then $BLOB_LORA_DATA, then the Hub)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples per evaluation batch (default: the run's)",
    )
    p.add_argument(
        "--fold",
        type=int,
        default=None,
        help="weight samples per forward pass (default: all N at once)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="max prompt tokens, for a split with longer prompts than the run's data "
        "(default: the run's)",
    )
    p.add_argument("--model", help="base model, if it moved since training (default: the run's)")
    p.add_argument(
        "--ood-reference",
        metavar="ID_EVAL_DIR",
        help="in-distribution evaluation folder (or its predictions.jsonl): score the evaluated "
        "task(s) as OOD against it (AUROC/AUPR per uncertainty score, ood.json, ood_roc.png)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=EVAL_SEED,
        help=f"seed of the weight samples (default {EVAL_SEED}): the same numbers at every call",
    )
    add_scoring_override(p)
    add_eval_noise_override(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an evaluation already in the output folder (by default it is kept and "
        "the command refuses: RUN/eval/<task> holds the one made at the end of training)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("evaluate", "evaluate a trained run on one or more tasks (accuracy, ECE, NLL, Brier)")(
    _configure_evaluate
)
def run_evaluate(args: argparse.Namespace) -> int:
    from blob_lora.pipeline.evaluate_saved import default_eval_dir, evaluate_saved_run
    from blob_lora.tasks import get_task
    from blob_lora.training.saved_run import load_run

    tasks = _task_list(args.task) if args.task else None
    if tasks is not None:
        check_distinct_dirs(tasks, "--task")
    for name, flag in (("eval_samples", "--eval-samples"), ("max_length", "--max-length")):
        value, low = getattr(args, name), 0 if name == "eval_samples" else 1
        if value is not None and value < low:
            raise BlobLoraError(f"{flag} must be >= {low}, got {value}")
    loaded = load_run(Path(args.run), model=args.model)
    cfg = loaded.config
    scoring = scoring_override(args, cfg)
    data_root = args.data_root or cfg.data.data_root
    tasks = tasks or [cfg.data.task]

    def out_dir(name: str) -> Path:
        if args.out:
            return Path(args.out) if len(tasks) == 1 else Path(args.out) / _safe(name)
        return default_eval_dir(args.run, name)

    for name in tasks:  # every task known before the first pass
        get_task(name, data_root=data_root)
    results = {}
    for name in tasks:
        results[name] = evaluate_saved_run(
            loaded,
            args.run,
            name,
            out_dir(name),
            split=args.split,
            n_samples=args.eval_samples,
            scoring=scoring,
            eval_noise=args.eval_noise,
            data_root=data_root,
            batch_size=args.batch_size,
            fold=args.fold,
            max_length=args.max_length,
            ood_reference=args.ood_reference,
            seed=args.seed,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
        print(_metrics_line(name, results[name]) + f"  -> {out_dir(name)}")
        _print_truncation_note(name, results[name])
    if args.out and len(tasks) > 1:
        from blob_lora.utils.atomic import atomic_write_json

        atomic_write_json(Path(args.out) / "summary.json", results)
    return 0


def _task_list(text: str) -> list[str]:
    """The tasks of ``--task``, split as ``--eval-tasks`` (``options.task_names``), with
    ``ood`` standing for the OOD protocol's."""
    names: list[str] = []
    for part in task_names(text):
        names.extend(OOD_TASKS if part == "ood" else [part])
    return names


def _safe(name: str) -> str:
    from blob_lora.tasks.dir_names import task_dir_name

    return task_dir_name(name)


def _configure_demo(p: argparse.ArgumentParser) -> None:
    from blob_lora.cli import demo

    demo.configure(p)


@command(
    "demo", "short real BLoB vs LoRA fine-tune of the embedded SmolLM2, in- and out-of-distribution"
)(_configure_demo)
def run_demo(args: argparse.Namespace) -> int:
    from blob_lora.cli import demo

    return demo.run(args)


def _dump(obj) -> str:
    return json.dumps(obj, indent=2)
