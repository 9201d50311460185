"""``blob-lora compare``: train/evaluate methods × tasks × seeds, then tabulate and plot.

Output layout (``DIR`` = ``--out``, the file's ``out`` key, or ``runs/compare/<name>``)::

    DIR/runs/<task>/<method>/seed<s>/   ordinary run folders ('blob-lora evaluate --run' works)
    DIR/results_id.md, results_id.csv   in-distribution table (tasks)
    DIR/results_ood.md, results_ood.csv OOD table (train_task's runs on eval_tasks), if any
    DIR/reliability_<task>.png          reliability curves of every method, per ID task
    DIR/reliability_ood_<task>.png      the same per OOD evaluation task
    DIR/compare.json                    the spec, every run's status, train_seconds and
                                        per-evaluation metrics incl. eval_seconds, table numbers

Task names become folder/file names with ``:`` → ``__`` (``mmlu__college_physics``).

A run is *finished* when ``RUN/summary.json`` exists and holds every evaluation the
experiment needs (own task; OOD tasks for the OOD training task; the ``eval_samples = 0``
evaluation for ``blob-mean``) on the expected split. Re-running skips finished runs,
evaluates the missing evaluations of trained runs without retraining (written into
``RUN/eval/<task>/`` or ``RUN/eval_mean/<task>/`` and merged into ``summary.json``), resumes
interrupted ones from their checkpoint and trains the rest. An evaluation is missing too when
it was scored otherwise than the file now asks (:data:`EVALUATION_SETTINGS`: another split,
another N, another weight noise): changing how runs are scored re-scores them, it never
retrains. A run whose ``run_config.json`` differs in what it learned from what the file now
asks for is refused (delete it or restore the setting), so tables never silently mix settings.

Several ``compare`` processes may work on one experiment at once (the same command started
again: one per GPU, or one-thread processes on a small CPU). Each claims a run before it
trains or evaluates it (``blob_lora.comparison.claims``: a lock the operating system drops when
the process dies) and takes the first run in plan order that no other process holds; a
composite run (ensemble, Laplace) waits while another process works on a run of its task and
seed, whose training it may copy. A process stops when the runs left are held by others.

Reliability diagrams pool the predictions of all finished seeds of a method (every seed's
examples in one set of 15 bins), which is steadier than one seed on small evaluation sets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from blob_lora.comparison.claims import RunClaims
from blob_lora.comparison.spec import Column, CompareSpec
from blob_lora.comparison.tables import (
    METRICS,
    build_table,
    render_csv,
    render_markdown,
    table_json,
)
from blob_lora.comparison.workers import SharedFailures
from blob_lora.evaluation.evaluate import EVAL_SEED, REQUESTED_SAMPLES, evaluate_on_task
from blob_lora.methods import get_method
from blob_lora.methods.composite import CompositeMethod
from blob_lora.metrics import reliability_diagram_multi
from blob_lora.pipeline import train
from blob_lora.tasks import get_task
from blob_lora.tasks.dir_names import FILE_LIMIT, fit_name, task_dir_name
from blob_lora.training.config import TrainConfig, setting_differences
from blob_lora.training.run_dir import RUN_CONFIG
from blob_lora.training.saved_run import load_run
from blob_lora.training.setup import training_data
from blob_lora.training.signals import TrainingInterrupted
from blob_lora.utils.atomic import atomic_write_json, atomic_write_text
from blob_lora.utils.errors import BlobLoraError, ConfigError

RUNS_DIR = "runs"
SUMMARY = "summary.json"
PREDICTIONS = "predictions.jsonl"
# Settings that do not change what a finished run learned or how it was scored: the ones the
# trainer itself lets a resumed run change (caches, logging, the held-out curve), and where
# the data is read from.
IGNORED_DIFFERENCES = frozenset(TrainConfig.NOT_LEARNED)
#: Settings that change how a trained run is scored, not what it learned: a run that differs
#: only in these is scored again (each evaluation's own record says how it was scored:
#: :func:`_scored_as_asked`), not refused as stale.
EVALUATION_SETTINGS = frozenset(TrainConfig.EVALUATION_ONLY)
# how often a process whose remaining runs wait for another process's run looks again
CLAIM_POLL_SECONDS = 30.0


def safe_name(name: str) -> str:
    return task_dir_name(name)


@dataclass
class Evaluation:
    column: Column
    task: str
    split: str | None  # None: the task's default eval split


@dataclass
class PlannedRun:
    task: str
    method: str
    seed: int
    dir: Path
    settings: dict[str, Any]
    evaluations: list[Evaluation]
    status: str = "train"  # done | evaluate | resume | train | failed | stale
    missing: list[Evaluation] = field(default_factory=list)
    error: str | None = None
    #: how the folder's settings differ from the experiment's (``--collect-only`` leaves such
    #: a run out of the tables instead of refusing it)
    stale: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.task}/{self.method}/seed{self.seed}"

    @cached_property
    def config(self) -> TrainConfig:
        """The settings the experiment asks of this run, as the trainer reads them."""
        return TrainConfig.from_dict(self.settings)

    @cached_property
    def asked_samples(self) -> int | None:
        """The N these settings ask for (``Method.samples_asked_by``)."""
        return get_method(self.config.method).samples_asked_by(self.config)

    @cached_property
    def default_samples(self) -> int | None:
        """The N the method's runs are asked for where no ``eval_samples`` is set."""
        unset = self.config.replace(eval_samples=None)
        return get_method(self.config.method).samples_asked_by(unset)


def run_dir(spec: CompareSpec, task: str, method: str, seed: int) -> Path:
    return spec.out / RUNS_DIR / safe_name(task) / method / f"seed{seed}"


def plan(spec: CompareSpec) -> list[PlannedRun]:
    """Every run the experiment needs, with the evaluations each must end up with.

    Ordered seed, then method (as listed in the spec), then task, with the spec's ``run_first``
    methods done for every seed before the rest: an experiment stopped part way has whole
    comparisons of its first methods across every task, rather than every method on its first
    task only.
    """
    runs = []
    columns = spec.columns
    for seed, method in spec.run_order:
        cols = [c for c in columns if c.train_method == method]
        for task in spec.train_tasks:
            d = run_dir(spec, task, method, seed)
            evals = [
                Evaluation(c, t, spec.eval_split(t, own=(t == task)))
                for c in cols
                for t in spec.eval_tasks_of(task)
            ]
            settings = spec.run_settings(task, method, seed, d)
            runs.append(PlannedRun(task, method, seed, d, settings, evals))
    for r in runs:
        _set_status(r)
    return runs


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _expected_split(ev: Evaluation, data_root: str | None) -> str:
    if ev.split is not None:
        return ev.split
    return str(get_task(ev.task, data_root=data_root).eval_split)


def _has(r: PlannedRun, summary: dict[str, Any], ev: Evaluation) -> bool:
    """Whether ``summary`` holds ``ev``: its column and task, scored as the experiment now
    asks (:func:`_scored_as_asked`: split, N, weight noise), and (metrics that record it) on
    the data as it is now: an evaluation of data that has changed since is made again."""
    data_root = r.settings.get("data_root")
    m = (summary.get(ev.column.key) or {}).get(ev.task)
    if not isinstance(m, dict) or "accuracy" not in m:
        return False
    if str(m.get("split")) != _expected_split(ev, data_root):
        return False
    if not _scored_as_asked(r, m, ev):
        return False
    scored = m.get("data")
    if scored is None:  # from before the record
        return True
    return scored == get_task(ev.task, data_root=data_root).source_fingerprint(str(m["split"]))


def _scored_as_asked(r: PlannedRun, m: dict[str, Any], ev: Evaluation) -> bool:
    """Whether the evaluation ``m`` drew the samples the experiment now asks for ``ev``.

    A column with a fixed N (``blob-mean``: 0) needs that N. Otherwise an evaluation that drew
    samples (``eval_samples`` > 0 in its metrics) needs the N requested now; its own request
    is its :data:`REQUESTED_SAMPLES` record, or, for an evaluation made before the record or
    at the end of training, the run's ``eval_samples`` setting in ``run_config.json``. An
    evaluation of N = 0 (a method whose predictive is not random) stands for any request. The
    weight noise (``eval_noise``, recorded where samples were drawn with one) must be the one
    asked now."""
    if ev.column.eval_samples is not None:
        return m.get("eval_samples") == ev.column.eval_samples
    if REQUESTED_SAMPLES in m:
        requested = m[REQUESTED_SAMPLES]
    else:
        stored = TrainConfig.stored_with_defaults(_read_json(r.dir / RUN_CONFIG) or {})
        requested = stored.get("eval_samples")
    if requested is None:  # the default then: the same for every run of the method
        requested = r.default_samples
    if requested != r.asked_samples:
        # another N changes nothing only for a method that never samples (LoRA: N = 0)
        return not get_method(r.config.method).random_predictive
    noise = m.get("eval_noise")
    return noise is None or noise == r.config.blob.eval_noise


def _set_status(r: PlannedRun) -> None:
    if r.stale:
        r.status = "stale"
        return
    summary = _read_json(r.dir / SUMMARY)
    if summary is not None:
        r.missing = [ev for ev in r.evaluations if not _has(r, summary, ev)]
        r.status = "evaluate" if r.missing else "done"
    else:
        r.missing = list(r.evaluations)
        r.status = "resume" if (r.dir / RUN_CONFIG).is_file() else "train"


def _refresh(runs: list[PlannedRun]) -> None:
    """Read every run's state again (a failure this process recorded stays): other
    ``compare`` processes finish runs meanwhile, and tables written from the states read
    earlier would show those runs as unfinished."""
    for r in runs:
        if r.status != "failed":
            _set_status(r)


def config_differences(r: PlannedRun) -> list[str]:
    """Settings of an existing run folder that differ from what the experiment asks for, and
    its training data where that has changed since it was trained (``summary.json``'s
    ``train_data``; a run interrupted on changed data is refused by its resume)."""
    previous = _read_json(r.dir / RUN_CONFIG)
    if previous is None:
        return []
    previous = TrainConfig.stored_with_defaults(previous)
    wanted = r.config.to_dict()
    changed = [
        f"{k} ({previous.get(k)!r} -> {wanted.get(k)!r})"
        for k in setting_differences(previous, wanted, IGNORED_DIFFERENCES | EVALUATION_SETTINGS)
    ]
    trained_on = (_read_json(r.dir / SUMMARY) or {}).get("train_data")
    if not changed and trained_on is not None and trained_on != training_data(r.config):
        changed.append("the training data (changed since the run was trained)")
    return changed


# ------------------------------------------------------------------------------ executing


def _train(r: PlannedRun, runs: list[PlannedRun], progress: bool) -> None:
    """Train (or resume) ``r``; a composite method may take any trained run of the
    experiment that trained exactly as one of its sub-runs would (an ensemble's member 0 under
    ``ensemble_share_seed``: the LoRA run of the same seed) instead of training it again."""
    cfg = r.config
    trained = shareable_runs(r, runs)
    train(cfg, resume=(r.dir / RUN_CONFIG).is_file(), progress=progress, finished_runs=trained)


def shareable_runs(r: PlannedRun, runs: list[PlannedRun]) -> list[Path]:
    """The trained run folders ``r``'s sub-runs may be copied from: every other finished run,
    then the finished sub-runs of the other composite runs (which ``share_finished_run`` takes
    only where they trained exactly as the sub-run would). Why the sub-runs: where the LoRA run
    of a seed is gone or was published without its adapter, the first composite run to need it
    (an ensemble's member 0) trains it once, and the next (Laplace's MAP run) takes that copy
    instead of training it a third time."""
    others = [o for o in runs if o is not r]
    finished = [o.dir for o in others if (o.dir / SUMMARY).is_file()]
    for o in others:
        if not _is_composite(o) or not o.dir.is_dir():
            continue
        method = get_method(o.settings["method"])  # o.method may name a variant
        for sub in method.sub_runs(o.config):
            if (o.dir / sub.folder / SUMMARY).is_file():
                finished.append(o.dir / sub.folder)
    return finished


def _evaluate_missing(r: PlannedRun, progress: bool) -> None:
    """Evaluate the run's missing evaluations and merge them into its summary.json."""
    summary = _read_json(r.dir / SUMMARY) or {}
    data_root = r.settings.get("data_root")
    missing = [ev for ev in r.evaluations if not _has(r, summary, ev)]
    if not missing:
        return
    loaded = load_run(r.dir)
    cfg = loaded.config
    # how to run the pass (batch, caches) and how to score it (N, weight noise) are the
    # experiment file's as it is now: settings that change nothing the run learned, so
    # editing them (a smaller batch for a long OOD task, another N) must re-score, not refuse
    now = r.config
    for ev in missing:
        task = get_task(ev.task, data_root=data_root or cfg.data.data_root)
        n = ev.column.eval_samples if ev.column.eval_samples is not None else r.asked_samples
        metrics = evaluate_on_task(
            loaded.model,
            loaded.method,
            loaded.tokenizer,
            task,
            r.dir / ev.column.subdir / safe_name(ev.task),
            split=ev.split or "eval",
            n_samples=n,
            max_length=cfg.data.max_length,
            batch_size=now.evaluation.eval_batch_size,
            cache_dir=now.data.cache_dir,
            progress=progress,
            prefix_cache=now.base.prefix_cache,
            scoring=cfg.data.scoring_spec,
            eval_noise=now.blob.eval_noise,
            seed=EVAL_SEED,
        )
        summary.setdefault(ev.column.key, {})[ev.task] = metrics
        atomic_write_json(r.dir / SUMMARY, summary)


def run_compare(
    spec: CompareSpec,
    *,
    collect_only: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    failed: dict[str, str] | None = None,
    shared_failures: SharedFailures | None = None,
) -> dict[str, Any]:
    """Bring every run to finished (unless ``collect_only``/``dry_run``), then write outputs.

    Returns the compare.json content (also on a dry run, where nothing is written). A run
    that fails with a user-level error (e.g. diverged) is reported and skipped; the others
    go on, and ``result["failed"]`` lists the failures. Other ``compare`` processes may work
    on the same folder at the same time: each run is worked on by one of them (``_work``).
    ``failed`` (run label -> error) marks runs that failed in such a process, so that the
    tables written after them record it; ``shared_failures`` (the processes of one
    ``--workers`` command) records this process's failures and skips the others'.
    """
    runs = plan(spec)
    for r in runs:
        if failed and r.label in failed:
            r.status, r.error = "failed", failed[r.label]
    stale = [(r, config_differences(r)) for r in runs if r.dir.exists()]
    stale = [(r, d) for r, d in stale if d]
    if stale:
        lines = [f"  {r.dir}: " + ", ".join(d) for r, d in stale]
        if not collect_only:
            raise ConfigError(
                "these run folders were made with other settings than the experiment file now "
                "asks for; delete them or restore the settings:\n" + "\n".join(lines)
            )
        # collecting never mixes settings either: such runs are left out of the tables, and
        # compare.json names them (status "stale", "differences")
        for r, d in stale:
            r.stale = d
            _set_status(r)
        echo(
            "left out of the tables, made with other settings than the experiment file now "
            "asks for:\n" + "\n".join(lines)
        )
    todo = [r for r in runs if r.status != "done"]
    echo(
        f"compare {spec.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, "
        f"{sum(r.status in ('train', 'resume') for r in runs)} to train, "
        f"{sum(r.status == 'evaluate' for r in runs)} to evaluate -> {spec.out}"
    )
    if dry_run or collect_only:
        for r in runs:
            extra = ""
            if r.status not in ("done", "stale"):
                extra = " (" + ", ".join(f"{e.column.name}@{e.task}" for e in r.missing) + ")"
            verb = r.status if not collect_only or r.status in ("done", "stale") else "unfinished"
            echo(f"  {verb:<10} {r.label}{extra}")
    if dry_run:
        return collect(spec, runs)
    if not collect_only:
        _work(spec, runs, progress, echo, shared_failures)
    return write_outputs(spec, runs, plots=True)


def _is_composite(r: PlannedRun) -> bool:
    return isinstance(get_method(r.settings["method"]), CompositeMethod)


def waits_for(r: PlannedRun, held: list[PlannedRun]) -> bool:
    """Whether ``r`` should wait while other processes hold the runs ``held``: it does while
    one of them has its task and seed and either is composite. A composite run copies its
    sub-runs from the finished runs of its task and seed (an ensemble's member 0 is the LoRA
    run, Laplace's MAP run either of them); started now, it would train again what the other
    process is training."""
    return any(
        o.task == r.task and o.seed == r.seed and (_is_composite(r) or _is_composite(o))
        for o in held
        if o is not r
    )


def _work(
    spec: CompareSpec,
    runs: list[PlannedRun],
    progress: bool,
    echo: Callable[[str], None],
    shared_failures: SharedFailures | None = None,
) -> None:
    """Bring the runs to finished, in plan order, sharing them with any other ``compare``
    process on the same folder (``claims``): take the first unfinished run nobody holds,
    re-read its state under the claim, work on it, repeat. Wait while the only runs left
    wait for another process's run (``waits_for``); stop when the rest are held elsewhere.
    Each process works on a run once: one that failed, or is still unfinished after its
    turn, is reported and left."""
    claims = RunClaims(spec.out)
    tried: set[str] = set()
    while True:
        _refresh(runs)
        left = [r for r in runs if r.status != "done" and r.label not in tried]
        if not left:
            return
        held = [r for r in left if claims.held(r.label)]
        waiting = [r for r in left if r not in held and waits_for(r, held)]
        claim = r = None
        for r in left:
            if r in held or r in waiting:
                continue
            claim = claims.take(r.label)
            if claim is not None:
                break
        if claim is None:
            if not waiting:
                echo(f"{len(held)} unfinished runs held by other processes; this one stops")
                return
            time.sleep(CLAIM_POLL_SECONDS)
            continue
        with claim:
            _set_status(r)  # another process may have finished it since the state was read
            if r.status == "done":
                continue
            tried.add(r.label)
            if shared_failures is not None and shared_failures.has(r.label):
                r.status, r.error = "failed", shared_failures.error(r.label)
                continue  # another process of this command tried it already
            finished = sum(o.status in ("done", "failed") for o in runs)  # the ones behind
            echo(f"[{finished + 1}/{len(runs)}] {r.status} {r.label}")
            start = time.perf_counter()
            try:
                if r.status in ("train", "resume"):
                    _train(r, runs, progress)
                _evaluate_missing(r, progress)
            except BlobLoraError as exc:
                if isinstance(exc, TrainingInterrupted):
                    raise  # a signal stops the whole experiment; its checkpoint is saved
                r.status, r.error = "failed", str(exc)
                echo(f"  failed: {exc}")
                if shared_failures is not None:
                    shared_failures.add(r.label, str(exc))
                continue
            _set_status(r)
            echo(f"  {r.status} in {time.perf_counter() - start:.1f} s")
        write_outputs(spec, runs, plots=False)


# ------------------------------------------------------------------------------ collecting


def _metrics(r: PlannedRun, column: Column, task: str) -> dict[str, Any] | None:
    summary = _read_json(r.dir / SUMMARY)
    if summary is None:
        return None
    ev = next((e for e in r.evaluations if e.column == column and e.task == task), None)
    if ev is None or not _has(r, summary, ev):
        return None
    return summary[column.key][task]


def _table_values(
    spec: CompareSpec, runs: list[PlannedRun], train_task_of: Callable[[str], str], tasks: list[str]
) -> dict[str, dict[str, dict[str, list[float]]]]:
    index = {(r.task, r.method, r.seed): r for r in runs}
    values: dict[str, dict[str, dict[str, list[float]]]] = {m.key: {} for m in METRICS}
    for task in tasks:
        for column in spec.columns:
            for seed in spec.seeds:
                r = index.get((train_task_of(task), column.train_method, seed))
                m = None if r is None or r.stale else _metrics(r, column, task)
                if m is None:
                    continue
                for metric in METRICS:
                    values[metric.key].setdefault(task, {}).setdefault(column.name, []).append(
                        float(m[metric.key])
                    )
    return values


def collect(spec: CompareSpec, runs: list[PlannedRun]) -> dict[str, Any]:
    """compare.json content: spec, per-run status/timings/metrics, table numbers."""
    run_rows = []
    for r in runs:
        summary = _read_json(r.dir / SUMMARY) or {}
        evaluations: dict[str, Any] = {}
        for ev in r.evaluations:
            m = _metrics(r, ev.column, ev.task)
            if m is not None:
                evaluations.setdefault(ev.column.name, {})[ev.task] = m
        run_rows.append(
            {
                "task": r.task,
                "method": r.method,
                "seed": r.seed,
                "dir": str(r.dir.relative_to(spec.out)),
                "status": r.status,
                "error": r.error,
                **({"differences": r.stale} if r.stale else {}),
                "train_seconds": summary.get("train_seconds"),
                "eval_seconds": {
                    col: {t: m.get("eval_seconds") for t, m in by_task.items()}
                    for col, by_task in evaluations.items()
                },
                "evaluations": evaluations,
            }
        )
    names = [c.name for c in spec.columns]
    result: dict[str, Any] = {
        "spec": spec.to_dict(),
        "runs": run_rows,
        "failed": [f"{r.label}: {r.error}" for r in runs if r.error],
    }
    id_table = build_table(
        _table_values(spec, runs, lambda t: t, spec.tasks), names, spec.tasks, len(spec.seeds)
    )
    result["id"] = {"tasks": spec.tasks, "table": id_table}
    if spec.ood:
        ood_tasks = spec.eval_tasks_of(spec.ood.train_task)
        train_task = spec.ood.train_task
        ood_table = build_table(
            _table_values(spec, runs, lambda t: train_task, ood_tasks),
            names,
            ood_tasks,
            len(spec.seeds),
        )
        result["ood"] = {"tasks": ood_tasks, "table": ood_table}
    return result


def _note(spec: CompareSpec, setting: str) -> str:
    seeds = ", ".join(str(s) for s in spec.seeds)
    text = (
        f"Mean ± sample std over seeds {seeds}; **bold** = best in the column (highest ACC, "
        "lowest ECE, NLL, Brier, compared as printed). ACC and ECE in %. `(n/N)`: only n of "
        "the N seeds finished; `–`: none."
    )
    if setting == "ood" and spec.ood:
        text += (
            f" All runs trained on {spec.ood.train_task} (first column: in-distribution) and "
            "evaluated without further training on the other tasks."
        )
    return text


def write_outputs(spec: CompareSpec, runs: list[PlannedRun], plots: bool = True) -> dict[str, Any]:
    """Write the tables, compare.json and (``plots``) the reliability diagrams, from the
    runs' states as they are on disk now (``_refresh``)."""
    _refresh(runs)
    result = collect(spec, runs)
    names = [c.name for c in spec.columns]
    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    settings = [("id", "in-distribution")] + ([("ood", "out-of-distribution")] if spec.ood else [])
    for setting, title in settings:
        tasks, table = result[setting]["tasks"], result[setting]["table"]
        labels = {}
        if setting == "ood" and spec.ood:
            labels = {spec.ood.train_task: f"{spec.ood.train_task} (ID)"}
        md = render_markdown(
            f"{spec.name}: {title}", _note(spec, setting), table, names, tasks, labels
        )
        atomic_write_text(out / f"results_{setting}.md", md)
        atomic_write_text(out / f"results_{setting}.csv", render_csv(setting, table, names, tasks))
    if plots:
        result["plots"] = _reliability_plots(spec, runs)
    _remove_outdated_outputs(out, [s for s, _ in settings], result.get("plots") if plots else None)
    serial = dict(result)
    for setting, _ in settings:
        serial[setting] = {
            "tasks": result[setting]["tasks"],
            "table": table_json(result[setting]["table"]),
        }
    atomic_write_json(out / "compare.json", serial)
    return serial


def _remove_outdated_outputs(out: Path, settings: list[str], plots: list[str] | None) -> None:
    """Remove tables (and, when ``plots`` were written, diagrams) of an earlier version of the
    experiment file that this one no longer makes (``ood`` dropped, a task removed): left
    beside the new ones they would read as current. Only the names this module writes."""
    keep = {f"results_{s}.{ext}" for s in settings for ext in ("md", "csv")}
    patterns = ["results_*.md", "results_*.csv"]
    if plots is not None:
        keep |= set(plots)
        patterns.append("reliability_*.png")
    for pattern in patterns:
        for path in out.glob(pattern):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def _pooled_predictions(
    spec: CompareSpec, runs: list[PlannedRun], column: Column, train_task: str, task: str
) -> tuple[list[list[float]], list[int]] | None:
    probs: list[list[float]] = []
    labels: list[int] = []
    for r in runs:
        if r.task != train_task or r.method != column.train_method or r.stale:
            continue
        if _metrics(r, column, task) is None:
            continue
        path = r.dir / column.subdir / safe_name(task) / PREDICTIONS
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, json.JSONDecodeError):
            continue
        probs += [row["probs"] for row in rows]
        labels += [int(row["label"]) for row in rows]
    return (probs, labels) if labels else None


def _plot_name(prefix: str, task: str) -> str:
    """``<prefix><task's folder name>.png``; the name is cut (:func:`fit_name`) where the plot,
    written atomically under a longer temporary name, would not fit a file name."""
    room = FILE_LIMIT - len(prefix) - len(".png")
    return f"{prefix}{fit_name(safe_name(task), room)}.png"


def _reliability_plots(spec: CompareSpec, runs: list[PlannedRun]) -> list[str]:
    jobs = [(t, t, _plot_name("reliability_", t), "ID") for t in spec.tasks]
    if spec.ood:
        jobs += [
            (spec.ood.train_task, t, _plot_name("reliability_ood_", t), "OOD")
            for t in spec.ood.eval_tasks
            if t != spec.ood.train_task
        ]
    written = []
    for train_task, task, filename, kind in jobs:
        curves = {}
        for column in spec.columns:
            pooled = _pooled_predictions(spec, runs, column, train_task, task)
            if pooled is not None:
                curves[column.name] = pooled
        if not curves:
            continue
        title = f"{task} ({kind}, seeds pooled)"
        if kind == "OOD":
            title = f"{task} (trained on {train_task}, seeds pooled)"
        reliability_diagram_multi(curves, spec.out / filename, title=title)
        written.append(filename)
    return written
