"""ABMLL's table (issue 24): meta-train per seed, meta-evaluate ABMLL and every baseline on the
seed's held-out tasks, and average over seeds; before that, ABMLL's free settings chosen on
held-out *meta-train* tasks, never on a task any seed holds out.

The experiment is one YAML file (``paper/abmll_tables.yaml``)::

    name: abmll_tables
    out: paper/out/abmll_tables
    seeds: [1, 2, 3]
    baselines: [zero-shot, lora-support, blob-support, multitask-lora]
    meta: {...}            # meta-train's options as config-file keys (``k_shot``, ``abmll_beta``)
    select:                # optional: choose settings first
      validation_tasks: 5  # held out from the selection runs' own collection
      seed: 0              # the selection runs' split, draws and samples
      metric: nll          # lowest mean over the validation tasks wins (accuracy: highest)
      meta: {...}          # overrides of ``meta`` for the selection runs (e.g. fewer steps)
      grid: {abmll_gamma: [0.0, 1.0e-9, 1.0e-7]}   # every combination is one selection run

**Selection.** Each seed's split of the collection holds out ``meta_test_tasks`` tasks. The
selection runs meta-train on the collection *minus every seed's held-out tasks*, holding out
``validation_tasks`` of those for themselves, and score ABMLL there; the grid point with the
best mean ``metric`` over the validation tasks is written to ``<out>/selection.json`` and used
by every run of the table. No task a seed is evaluated on is seen by the choice.

**Table.** Per seed, ``<out>/runs/seed<s>``: ``blob-lora meta-train`` (resumed from its
checkpoints if a previous invocation was stopped; a finished run is kept), then
``meta-evaluate`` for ABMLL and each baseline (a ``meta_eval*.json`` already there is kept).
``<out>/table.md`` / ``table.json`` hold each contender's mean over the seed's held-out tasks,
averaged over the finished seeds (± sample std over seeds), the per-seed values, and the wall
seconds each stage took (``timing.json`` in each run folder: seconds per invocation segment,
so a resumed stage sums its segments; a segment a kill ended is missing). An evaluation
stopped part way resumes with the held-out tasks it had not scored, and its cost over all
sittings is the sum of its tasks' ``task_seconds`` (``eval_seconds`` in the table).

Every stage is resumable: run the same command again after a stop.

    OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/python paper/abmll_tables.py \
        paper/abmll_tables.yaml [--stage select|table|all] [--dry-run]

**Across machines.** ``paper/out/`` is not in git. ``--publish DIR`` copies every *complete*
run (meta-trained, and every contender it owes scored: a selection point's ABMLL, a seed's
ABMLL and baselines) into ``DIR`` without its weights (``adapter/``, checkpoints, the
multi-task LoRA's safetensors), with ``selection.*`` and ``table.*``; ``--restore DIR`` puts
them back where ``out`` lacks them, so a new machine goes on from there instead of training
them again. A meta-trained seed run whose ABMLL result is in but which still owes baselines is
published too (with the baselines' per-task progress files), so a session that ends part way
through the baselines does not cost the next machine the meta-training: no baseline reads the
global parameters, only the adaptation budget (``adapter/abmll_config.json``, published; the progress key
is the budget, not the weights' bytes). A run still meta-training or scoring ABMLL is neither
published nor restored (both need the weights). A restored run has no weights: a baseline added
to the plan later runs on it, ABMLL's evaluation cannot (delete the folder to meta-train again).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blob_lora.cli.commands.meta import settings_from_values
from blob_lora.pipeline.meta_baselines import BASELINES
from blob_lora.pipeline.meta_config import MetaConfig
from blob_lora.pipeline.meta_evaluate import AVERAGED, META_EVAL_FILE, meta_evaluate
from blob_lora.pipeline.meta_loop import REPLACED
from blob_lora.pipeline.meta_multitask import MULTITASK_DIR
from blob_lora.pipeline.meta_train import ADAPTER_DIR, TASKS_FILE, is_finished, meta_train
from blob_lora.tasks.collection import collection_names, split_tasks
from blob_lora.training.run_dir import CHECKPOINTS
from blob_lora.tuners.abmll import AbmllConfig
from blob_lora.tuners.abmll.config import ABMLL_CONFIG_NAME
from blob_lora.utils.atomic import atomic_directory, atomic_write_json, atomic_write_text
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.json_file import read_json_object

TIMING_FILE = "timing.json"
SELECTION_FILE = "selection.json"
#: lower is better for these metrics; accuracy is the one where higher is better
LOWER_IS_BETTER = ("nll", "ece", "brier")
PLAN_KEYS = {"name", "out", "seeds", "baselines", "meta", "select"}
SELECT_KEYS = {"validation_tasks", "seed", "metric", "meta", "grid"}


@dataclass(frozen=True)
class Selection:
    """The ``select`` section: how ABMLL's free settings are chosen (module doc)."""

    grid: dict[str, list[Any]]
    validation_tasks: int = 5
    seed: int = 0
    metric: str = "nll"
    meta: dict[str, Any] = field(default_factory=dict)

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, in the file's order."""
        keys = list(self.grid)
        return [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*self.grid.values())
        ]


@dataclass(frozen=True)
class Plan:
    """One experiment file, checked."""

    path: Path
    name: str
    out: Path
    seeds: list[int]
    baselines: list[str]
    meta: dict[str, Any]
    select: Selection | None


def load_plan(path: str | Path) -> Plan:
    """The experiment file ``path``; a bad key or value is refused naming the file."""
    path = Path(path)
    try:
        import yaml

        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a mapping of settings")
    unknown = sorted(set(raw) - PLAN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; allowed: {sorted(PLAN_KEYS)}")
    for key in ("name", "out", "seeds", "meta"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    seeds = raw["seeds"]
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers")
    baselines = raw.get("baselines", [])
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"{path}: unknown baselines {bad}; choose from {list(BASELINES)}")
    if not isinstance(raw["meta"], dict):
        raise ConfigError(f"{path}: meta must be a mapping of meta-train settings")
    settings(raw["meta"], where=f"{path}: meta")  # every key and value checked up front
    select = _load_selection(raw.get("select"), raw["meta"], path)
    return Plan(
        path, str(raw["name"]), Path(raw["out"]), seeds, list(baselines), raw["meta"], select
    )


def _load_selection(raw: Any, meta: dict[str, Any], path: Path) -> Selection | None:
    if raw is None:
        return None
    where = f"{path}: select"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - SELECT_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(SELECT_KEYS)}")
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}.grid must map settings to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.grid.{key} must be a non-empty list")
    metric = raw.get("metric", "nll")
    if metric not in AVERAGED:
        raise ConfigError(f"{where}.metric {metric!r}: choose from {list(AVERAGED)}")
    selection = Selection(
        grid=grid,
        validation_tasks=int(raw.get("validation_tasks", 5)),
        seed=int(raw.get("seed", 0)),
        metric=metric,
        meta=dict(raw.get("meta") or {}),
    )
    for point in selection.points():
        settings({**meta, **selection.meta, **point}, where=f"{where}.grid {point}")
    return selection


def settings(values: dict[str, Any], *, where: str) -> tuple[MetaConfig, AbmllConfig]:
    """meta-train's settings from config-file keys, as ``blob-lora meta-train --config``
    reads them (``settings_from_values``); an error names ``where``."""
    try:
        return settings_from_values(values)
    except (ConfigError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def held_out_by_seeds(meta: dict[str, Any], seeds: list[int]) -> list[str]:
    """Every task that some seed of the table holds out (names only; nothing is loaded)."""
    cfg, _ = settings(meta, where="meta")
    names = collection_names(cfg.tasks)
    held: set[str] = set()
    for seed in seeds:
        held.update(split_tasks(names, cfg.meta_test_tasks, seed)[1])
    return [n for n in names if n in held]


def selection_collection(plan: Plan) -> list[str]:
    """The selection runs' tasks: the collection minus every seed's held-out tasks; refused
    when too few are left to hold out ``validation_tasks`` and still meta-train."""
    assert plan.select is not None
    cfg, _ = settings(plan.meta, where="meta")
    held = set(held_out_by_seeds(plan.meta, plan.seeds))
    rest = [n for n in collection_names(cfg.tasks) if n not in held]
    if len(rest) <= plan.select.validation_tasks:
        raise ConfigError(
            f"{plan.path}: {len(rest)} tasks are left after every seed's held-out tasks: "
            f"too few to hold out {plan.select.validation_tasks} for validation and train on "
            "the rest (lower meta.meta_test_tasks, select.validation_tasks or the seeds)"
        )
    if any("," in n for n in rest):
        raise ConfigError(f"{plan.path}: a task name holds a comma: {rest}")
    return rest


def point_name(point: dict[str, Any]) -> str:
    """A folder name for one grid point (``abmll_gamma=1e-07``)."""
    return ",".join(f"{k}={v!r}" for k, v in point.items()).replace("/", "_")


@contextmanager
def timed(folder: Path, key: str) -> Iterator[None]:
    """Add the seconds the block ran to ``timing.json``'s list under ``key`` (one entry per
    invocation segment)."""
    start = time.perf_counter()
    try:
        yield
    finally:  # a segment a signal stops counts too (a SIGKILL's is lost)
        path = folder / TIMING_FILE
        timing = read_json_object(path, ConfigError) if path.exists() else {}
        timing.setdefault(key, []).append(round(time.perf_counter() - start, 1))
        atomic_write_json(path, timing)


def train_and_evaluate(
    folder: Path, values: dict[str, Any], contenders: list[str], *, progress: bool
) -> dict[str, dict[str, Any]]:
    """One meta-learning run in ``folder`` (resumed or kept when there is one) and each
    contender's ``meta_eval*.json`` (kept when there is one); returns them by contender."""
    cfg, abmll = settings(values, where=str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    if not is_finished(folder):
        with timed(folder, "meta_train_s"):
            meta_train(cfg, folder, abmll, resume=True, progress=progress)
    results = {}
    for name in contenders:
        baseline = None if name == "abmll" else name
        path = folder / (META_EVAL_FILE if baseline is None else f"meta_eval_{baseline}.json")
        if (
            baseline is None
            and not path.exists()
            and not any((folder / ADAPTER_DIR).glob("*.safetensors"))
        ):
            raise ConfigError(
                f"{folder} owes ABMLL's evaluation but holds no global parameters (a run "
                "restored from published results keeps no weights): delete the folder to "
                "meta-train it again"
            )
        if not path.exists():
            with timed(folder, f"meta_evaluate_{name}_s"):
                meta_evaluate(folder, baseline=baseline, progress=progress)
        results[name] = read_json_object(path, ConfigError)
    return results


def run_selection(plan: Plan, *, progress: bool) -> dict[str, Any]:
    """Every grid point meta-trained and scored on the validation tasks; the winner written to
    ``selection.json`` (kept when it is there: delete it to choose again)."""
    assert plan.select is not None
    done = plan.out / SELECTION_FILE
    if done.exists():
        return read_json_object(done, ConfigError)
    sel = plan.select
    tasks = ",".join(selection_collection(plan))
    rows = []
    for point in sel.points():
        values = {
            **plan.meta,
            **sel.meta,
            **point,
            "tasks": tasks,
            "meta_test_tasks": sel.validation_tasks,
            "seed": sel.seed,
        }
        folder = plan.out / "select" / point_name(point)
        result = train_and_evaluate(folder, values, ["abmll"], progress=progress)["abmll"]
        rows.append({"settings": point, "mean": result["mean"], "tasks": sorted(result["tasks"])})
    better = min if sel.metric in LOWER_IS_BETTER else max
    best = better(rows, key=lambda r: r["mean"][sel.metric])
    summary = {
        "metric": sel.metric,
        "chosen": best["settings"],
        "validation_tasks": best["tasks"],
        "excluded_held_out_tasks": held_out_by_seeds(plan.meta, plan.seeds),
        "rows": rows,
    }
    atomic_write_json(done, summary)
    atomic_write_text(plan.out / "selection.md", selection_markdown(summary))
    return summary


def selection_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Selection of ABMLL's settings (lowest/highest mean {summary['metric']} on "
        "held-out meta-train tasks)",
        "",
        "Validation tasks (meta-train tasks of every seed, held out from the selection runs): "
        + ", ".join(summary["validation_tasks"]),
        "",
        "| settings | " + " | ".join(AVERAGED) + " |",
        "|---|" + "---|" * len(AVERAGED),
    ]
    for row in summary["rows"]:
        cells = " | ".join(f"{row['mean'][k]:.4f}" for k in AVERAGED)
        mark = " (chosen)" if row["settings"] == summary["chosen"] else ""
        lines.append(f"| {point_name(row['settings'])}{mark} | {cells} |")
    return "\n".join(lines) + "\n"


def run_table(plan: Plan, chosen: dict[str, Any], *, progress: bool) -> dict[str, Any]:
    """Every seed's run and contenders (resumable), then the table over finished seeds."""
    contenders = ["abmll", *plan.baselines]
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    timing: dict[int, dict[str, Any]] = {}
    for seed in plan.seeds:
        folder = plan.out / "runs" / f"seed{seed}"
        values = {**plan.meta, **chosen, "seed": seed}
        per_seed[seed] = train_and_evaluate(folder, values, contenders, progress=progress)
        timed_file = folder / TIMING_FILE  # absent for a run made outside this script
        timing[seed] = read_json_object(timed_file, ConfigError) if timed_file.exists() else {}
        # meta-training's own count over all its sittings, kills included (tasks.json)
        trained = read_json_object(folder / TASKS_FILE, ConfigError).get("train_seconds")
        if trained is not None:
            timing[seed]["meta_train_all_sittings_s"] = trained
    table = summarise(per_seed, contenders)
    table.update({"name": plan.name, "chosen": chosen, "timing_s": timing})
    atomic_write_json(plan.out / "table.json", table)
    atomic_write_text(plan.out / "table.md", table_markdown(table))
    return table


def summarise(
    per_seed: dict[int, dict[str, dict[str, Any]]], contenders: list[str]
) -> dict[str, Any]:
    """Each contender's per-seed means (over that seed's held-out tasks) and their mean and
    sample std over seeds; also each contender's difference from ABMLL within a seed."""
    rows: dict[str, Any] = {}
    for name in contenders:
        values = {s: per_seed[s][name]["mean"] for s in per_seed}
        rows[name] = {
            "per_seed": values,
            "mean": {k: statistics.fmean(v[k] for v in values.values()) for k in AVERAGED},
            "std": {k: _std([v[k] for v in values.values()]) for k in AVERAGED},
            "eval_samples": {s: per_seed[s][name].get("eval_samples") for s in per_seed},
            "eval_seconds": {s: _eval_seconds(per_seed[s][name]) for s in per_seed},
            "held_out": {s: sorted(per_seed[s][name]["tasks"]) for s in per_seed},
        }
    return {"seeds": sorted(per_seed), "contenders": rows}


def _eval_seconds(result: dict[str, Any]) -> float | None:
    """A contender's evaluation wall seconds over all its sittings: the sum of its held-out
    tasks' ``task_seconds`` (``None`` for a file written before they were recorded)."""
    seconds = result.get("task_seconds")
    return round(sum(seconds.values()), 1) if seconds else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def table_markdown(table: dict[str, Any]) -> str:
    seeds = table["seeds"]
    lines = [
        f"# {table['name']}: mean over each seed's held-out tasks, then over seeds "
        f"{seeds} (± sample std over seeds)",
        "",
        f"Settings chosen on held-out meta-train tasks: {table['chosen'] or 'none (defaults)'}",
        "",
        "| method | N | " + " | ".join(AVERAGED) + " |",
        "|---|---|" + "---|" * len(AVERAGED),
    ]
    for name, row in table["contenders"].items():
        n = sorted({v for v in row["eval_samples"].values() if v is not None})
        cells = []
        for k in AVERAGED:
            std = row["std"][k]
            cells.append(f"{row['mean'][k]:.4f}" + (f" ± {std:.4f}" if std is not None else ""))
        lines.append(f"| {name} | {','.join(map(str, n)) or '-'} | " + " | ".join(cells) + " |")
    lines += ["", "Held-out tasks per seed:", ""]
    first = next(iter(table["contenders"].values()))
    for seed in seeds:
        lines.append(f"- seed {seed}: " + ", ".join(first["held_out"][seed]))
    lines += [
        "",
        "Wall seconds per stage: per invocation segment of this script (a segment a SIGKILL "
        "ended is missing), and meta-training's own total over all its sittings "
        "(`meta_train_all_sittings_s`, runs made since it is recorded):",
        "",
    ]
    for seed, stages in table["timing_s"].items():
        parts = ", ".join(
            f"{k} {'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in stages.items()
        )
        lines.append(f"- seed {seed}: {parts}")
    lines += [
        "",
        "Evaluation wall seconds per contender over all its sittings (the sum of its "
        "held-out tasks' `task_seconds`; `-`: written before they were recorded; "
        "multitask-lora's training is in its segments above, not here):",
        "",
    ]
    for seed in seeds:
        spent = {name: row["eval_seconds"].get(seed) for name, row in table["contenders"].items()}
        parts = ", ".join(f"{name} {'-' if s is None else s}" for name, s in spent.items())
        lines.append(f"- seed {seed}: {parts}")
    return "\n".join(lines) + "\n"


#: what a published run leaves behind: any tensor file, and everything in checkpoints and in a
#: replaced run's folder; of ``adapter/`` it keeps only ``abmll_config.json`` (the adaptation
#: budget every baseline reads): not the weights, nor PEFT's ``adapter_config.json``, which
#: names the base model by this machine's path
WEIGHT_DIRS = (CHECKPOINTS, REPLACED)
#: the baseline that keeps its own weights in the run folder (``MULTITASK_DIR``)
MULTITASK_BASELINE = "multitask-lora"
TOP_FILES = (SELECTION_FILE, "selection.md", "table.json", "table.md")


def complete_runs(plan: Plan) -> list[Path]:
    """The run folders of ``plan`` (relative to its ``out``) that are meta-trained and hold
    every contender's result they owe: ABMLL's for a selection point, ABMLL's and each
    baseline's for a seed."""
    owed = [META_EVAL_FILE, *(f"meta_eval_{b}.json" for b in plan.baselines)]
    wanted = [(plan.out / "runs" / f"seed{s}", owed) for s in plan.seeds]
    if plan.select is not None:
        wanted += [
            (plan.out / "select" / point_name(p), [META_EVAL_FILE]) for p in plan.select.points()
        ]
    return [
        folder.relative_to(plan.out)
        for folder, files in wanted
        if is_finished(folder) and all((folder / f).is_file() for f in files)
    ]


def started_runs(plan: Plan) -> list[Path]:
    """The seed run folders of ``plan`` (relative to its ``out``) that are meta-trained and
    hold ABMLL's result but still owe a baseline's: what a new machine can finish without the
    weights, since no baseline reads the global parameters."""
    owed = [f"meta_eval_{b}.json" for b in plan.baselines]
    folders = [plan.out / "runs" / f"seed{s}" for s in plan.seeds]
    return [
        folder.relative_to(plan.out)
        for folder in folders
        if is_finished(folder)
        and (folder / META_EVAL_FILE).is_file()
        and not all((folder / f).is_file() for f in owed)
    ]


def _is_weight(rel: Path) -> bool:
    return (
        rel.suffix in (".safetensors", ".bin", ".pt")
        or any(part in WEIGHT_DIRS for part in rel.parts[:-1])
        or (rel.parts[0] == ADAPTER_DIR and rel.name != ABMLL_CONFIG_NAME)
    )


def _left_behind(rel: Path, owes_multitask: bool) -> bool:
    """Whether a run's file ``rel`` stays out of the published copy: weights, and in a run still
    owing the multi-task baseline (``owes_multitask``) its half-made folder (its
    ``trained_under.json`` without the weights would claim weights a new machine lacks)."""
    return _is_weight(rel) or (owes_multitask and rel.parts[0] == MULTITASK_DIR)


def _owes_multitask(run: Path) -> bool:
    return not (run / f"meta_eval_{MULTITASK_BASELINE}.json").is_file()


def publish(plan: Plan, dest: Path) -> list[Path]:
    """Copy the complete and the started runs (no weights) and the selection and table files
    into ``dest``, each run replaced whole (``atomic_directory``); returns the runs copied."""
    runs = complete_runs(plan) + started_runs(plan)
    for rel in runs:
        source = plan.out / rel
        owes_multitask = _owes_multitask(source)
        with atomic_directory(dest / rel) as tmp:
            for path in sorted(source.rglob("*")):
                inner = path.relative_to(source)
                if path.is_file() and not _left_behind(inner, owes_multitask):
                    (tmp / inner).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, tmp / inner)
    for name in TOP_FILES:
        if (plan.out / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(plan.out / name, dest / name)
    return runs


def restore(plan: Plan, source: Path) -> list[Path]:
    """Copy the published runs of ``source`` back into ``out`` where ``out`` has no such
    folder (a folder there is the newer one), and the selection where ``out`` has none;
    returns the runs restored."""
    restored = []
    for tasks_file in sorted(source.glob("*/*/tasks.json")):
        rel = tasks_file.parent.relative_to(source)
        if (plan.out / rel).exists():
            continue
        with atomic_directory(plan.out / rel) as tmp:
            shutil.copytree(tasks_file.parent, tmp, dirs_exist_ok=True)
        restored.append(rel)
    for name in (SELECTION_FILE, "selection.md"):
        if (source / name).is_file() and not (plan.out / name).exists():
            plan.out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, plan.out / name)
    return restored


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the experiment file (paper/abmll_tables.yaml)")
    p.add_argument("--stage", choices=("select", "table", "all"), default="all")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--publish", metavar="DIR",
                   help="copy the complete runs (no weights) into DIR, run nothing")  # fmt: skip
    p.add_argument("--restore", metavar="DIR",
                   help="put DIR's published runs back where out lacks them, run nothing")  # fmt: skip
    args = p.parse_args(argv)
    try:
        plan = load_plan(args.config)
        if args.publish:
            runs = publish(plan, Path(args.publish))
            print(f"published {len(runs)} runs: " + ", ".join(map(str, runs)))
        if args.restore:
            runs = restore(plan, Path(args.restore))
            print(f"restored {len(runs)} runs: " + ", ".join(map(str, runs)))
        if args.publish or args.restore:
            return 0
        if args.dry_run:
            print(json.dumps(describe(plan), indent=2))
            return 0
        chosen: dict[str, Any] = {}
        if plan.select is not None and args.stage in ("select", "all"):
            chosen = run_selection(plan, progress=not args.no_progress)["chosen"]
        elif plan.select is not None:
            done = plan.out / SELECTION_FILE
            if not done.exists():
                raise ConfigError(f"{done}: no selection yet; run --stage select first")
            chosen = read_json_object(done, ConfigError)["chosen"]
        if args.stage in ("table", "all"):
            print(table_markdown(run_table(plan, chosen, progress=not args.no_progress)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def describe(plan: Plan) -> dict[str, Any]:
    """What the plan would run (``--dry-run``)."""
    out: dict[str, Any] = {
        "table_runs": [str(plan.out / "runs" / f"seed{s}") for s in plan.seeds],
        "contenders": ["abmll", *plan.baselines],
        "held_out_by_seeds": held_out_by_seeds(plan.meta, plan.seeds),
    }
    if plan.select is not None:
        out["selection_points"] = plan.select.points()
        out["selection_tasks"] = len(selection_collection(plan))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
