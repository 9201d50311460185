"""Did a method beat its baselines? The reproduction criterion, computed from ``compare.json``.

Issue 6 states what would count as reproducing the paper at our scale: on at least 4 of the 6
in-distribution tasks, BLoB (N = 10) has lower ECE *and* lower NLL than ``lora`` *and* ``map``,
with accuracy at most 2 points lower than each. Judging that by eye from a table of means
invites two mistakes this module rules out:

* comparing means over *different* seeds (BLoB's seed 1 against LoRA's seeds 1-3 while a table
  is still growing): every comparison here uses only the seeds that both methods finished;
* reading a verdict off a table that is still growing: a task whose baseline has not run is
  *pending*, and the outcome stays "undecided" until every compared method has finished every
  seed of the experiment (a task failing on seed 1 may pass on the mean of three).

The rule is parameterised (candidate, baselines, accuracy margin, tasks needed, whether every
out-of-distribution row must pass) so the same code checks both issues' criteria
(:data:`RULES`): issue 6's (the defaults) for the letter tables, issue 19's for the learning
regime's tables: BLoB below LoRA on ECE *and* NLL on at least 5 of the 6 tasks *and* on every
OOD row, accuracy at most 1.5 points lower. Every comparison also reports the ratio
ECE_candidate / ECE_baseline (the paper's shape is about 1/3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from blob_lora.comparison.tables import mean_std

PASS, FAIL, PENDING = "pass", "fail", "pending"


@dataclass(frozen=True)
class Rule:
    """One issue's criterion (``check``'s arguments, named)."""

    candidate: str
    baselines: tuple[str, ...]
    needed: int
    max_accuracy_drop: float
    ood: bool  # every out-of-distribution row must pass too
    source: str


RULES = {
    "issue6": Rule("blob", ("lora", "map"), 4, 2.0, False, "issue 6, the letter tables"),
    "issue19": Rule("blob", ("lora",), 5, 1.5, True, "issue 19, the learning regime's tables"),
}


@dataclass(frozen=True)
class Comparison:
    """Candidate vs one baseline on one task, over the seeds both finished (means)."""

    baseline: str
    seeds: tuple[int, ...]
    accuracy: tuple[float, float] = (float("nan"), float("nan"))  # (candidate, baseline), %
    ece: tuple[float, float] = (float("nan"), float("nan"))  # %
    nll: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def ran(self) -> bool:
        return bool(self.seeds)

    @property
    def ece_ratio(self) -> float:
        """ECE_candidate / ECE_baseline (nan when the baseline's ECE is 0 or not run)."""
        return self.ece[0] / self.ece[1] if self.ran and self.ece[1] else float("nan")

    def reasons(self, max_accuracy_drop: float) -> list[str]:
        out = []
        if not self.ece[0] < self.ece[1]:
            out.append(f"ECE {self.ece[0]:.2f} ≥ {self.ece[1]:.2f}")
        if not self.nll[0] < self.nll[1]:
            out.append(f"NLL {self.nll[0]:.3f} ≥ {self.nll[1]:.3f}")
        if self.accuracy[0] < self.accuracy[1] - max_accuracy_drop:
            out.append(
                f"ACC {self.accuracy[0]:.2f} < {self.accuracy[1]:.2f} − {max_accuracy_drop:g}"
            )
        return [f"vs {self.baseline}: {r}" for r in out]


@dataclass
class TaskVerdict:
    task: str
    status: str  # PASS, FAIL or PENDING
    comparisons: list[Comparison] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    candidate: str
    baselines: tuple[str, ...]
    tasks: list[TaskVerdict]
    needed: int
    max_accuracy_drop: float
    seeds: tuple[int, ...] = ()  # the experiment's seeds: the outcome waits for all of them
    ood: list[TaskVerdict] | None = None  # OOD rows, when the rule asks every one to pass
    source: str = "issue 6"

    @property
    def passed(self) -> int:
        return sum(t.status == PASS for t in self.tasks)

    @property
    def pending(self) -> int:
        return sum(t.status == PENDING for t in self.tasks)

    @property
    def complete(self) -> bool:
        rows = [*self.tasks, *(self.ood or [])]
        return all(c.seeds == self.seeds for t in rows for c in t.comparisons) and bool(self.seeds)

    @property
    def ood_passed(self) -> bool:
        return all(t.status == PASS for t in self.ood or [])

    @property
    def outcome(self) -> str:
        """'reproduced' / 'not reproduced' on complete results, else 'undecided'."""
        if not self.complete:
            return "undecided"
        ok = self.passed >= self.needed and self.ood_passed
        return "reproduced" if ok else "not reproduced"


def per_seed_metrics(
    compare: dict[str, Any], *, ood: bool = False
) -> dict[tuple[str, str, int], dict[str, float]]:
    """``(column, task, seed) -> metrics`` for in-distribution evaluations (a run's own task),
    or with ``ood`` for the others, as ``(column, ood_row_name(train, eval), seed)``."""
    out: dict[tuple[str, str, int], dict[str, float]] = {}
    for run in compare.get("runs", []):
        for column, by_task in (run.get("evaluations") or {}).items():
            for task, metrics in by_task.items():
                if (task == run["task"]) != ood and metrics is not None:
                    name = ood_row_name(run["task"], task) if ood else task
                    out[(column, name, int(run["seed"]))] = metrics
    return out


def ood_row_name(train_task: str, eval_task: str) -> str:
    return f"{eval_task} (OOD from {train_task})"


def ood_rows(compare: dict[str, Any]) -> list[str]:
    """The spec's OOD rows (``ood.train_task`` scored on each of ``ood.eval_tasks``)."""
    spec = (compare.get("spec") or {}).get("ood") or {}
    train = spec.get("train_task")
    return [ood_row_name(train, t) for t in spec.get("eval_tasks", [])] if train else []


def compare_on_task(
    metrics: dict[tuple[str, str, int], dict[str, float]],
    candidate: str,
    baseline: str,
    task: str,
) -> Comparison:
    seeds = sorted(
        s
        for (c, t, s) in metrics
        if c == candidate and t == task and (baseline, task, s) in metrics
    )
    if not seeds:
        return Comparison(baseline, ())

    def pair(key: str, scale: float) -> tuple[float, float]:
        return (
            scale * mean_std([metrics[(candidate, task, s)][key] for s in seeds])[0],
            scale * mean_std([metrics[(baseline, task, s)][key] for s in seeds])[0],
        )

    return Comparison(
        baseline, tuple(seeds), pair("accuracy", 100.0), pair("ece", 100.0), pair("nll", 1.0)
    )


def check(
    compare: dict[str, Any],
    candidate: str = "blob",
    baselines: Sequence[str] = ("lora", "map"),
    tasks: Sequence[str] | None = None,
    needed: int = 4,
    max_accuracy_drop: float = 2.0,
    *,
    ood: bool = False,
    source: str = "issue 6",
) -> Verdict:
    """The criterion over ``tasks`` (default: the compare's in-distribution tasks); with
    ``ood`` every row of the spec's OOD table is judged alike and must pass too."""
    if tasks is None:
        tasks = (compare.get("id") or {}).get("tasks") or compare["spec"]["tasks"]

    def judge(metrics: dict, rows: Sequence[str]) -> list[TaskVerdict]:
        verdicts = []
        for task in rows:
            comps = [compare_on_task(metrics, candidate, b, task) for b in baselines]
            reasons = [r for c in comps if c.ran for r in c.reasons(max_accuracy_drop)]
            if reasons:
                status = FAIL  # on the seeds finished so far
            elif all(c.ran for c in comps):
                status = PASS
            else:
                status = PENDING
            verdicts.append(TaskVerdict(task, status, comps, reasons))
        return verdicts

    seeds = tuple(sorted(int(s) for s in compare.get("spec", {}).get("seeds", ())))
    id_rows = judge(per_seed_metrics(compare), tasks)
    ood_verdicts = judge(per_seed_metrics(compare, ood=True), ood_rows(compare)) if ood else None
    return Verdict(
        candidate,
        tuple(baselines),
        id_rows,
        needed,
        max_accuracy_drop,
        seeds,
        ood_verdicts,
        source,
    )


def check_rule(compare: dict[str, Any], rule: str) -> Verdict:
    """``check`` under one of :data:`RULES` by name."""
    r = RULES[rule]
    return check(
        compare,
        r.candidate,
        r.baselines,
        needed=r.needed,
        max_accuracy_drop=r.max_accuracy_drop,
        ood=r.ood,
        source=r.source,
    )


def render_markdown(verdict: Verdict) -> str:
    """A section for results/: one row per task, every number the verdict rests on."""
    base = " and ".join(f"`{b}`" for b in verdict.baselines)
    ood_rule = " and on every out-of-distribution row" if verdict.ood is not None else ""
    fails = len(verdict.tasks) - verdict.passed - verdict.pending
    lines = [
        f"# Criterion ({verdict.source}): `{verdict.candidate}` vs {base}",
        "",
        f"Pass on a task: lower ECE **and** lower NLL than each of {base}, accuracy at most "
        f"{verdict.max_accuracy_drop:g} points lower; each comparison averages only the seeds "
        f"both methods finished. Needed: {verdict.needed} of {len(verdict.tasks)} tasks"
        f"{ood_rule}. `ECE ratio`: the candidate's ECE over the baseline's.",
        "",
        f"**Outcome: {verdict.outcome}** ({verdict.passed} pass, {verdict.pending} pending, "
        f"{fails} fail"
        + ("" if verdict.complete else "; not every seed of every method has finished")
        + ").",
        "",
        *_rows_table(verdict.tasks),
    ]
    if verdict.ood is not None:
        lines += ["", "Out of distribution (every row must pass):", "", *_rows_table(verdict.ood)]
    return "\n".join(lines) + "\n"


def _rows_table(rows: list[TaskVerdict]) -> list[str]:
    lines = [
        "| task | status | comparison (ACC % / ECE % / NLL, candidate vs baseline, seeds) "
        "| ECE ratio | why not |",
        "|---|---|---|---|---|",
    ]
    for t in rows:
        parts, ratios = [], []
        for c in t.comparisons:
            if not c.ran:
                parts.append(f"{c.baseline}: no seed finished by both yet")
                continue
            seeds = ",".join(str(s) for s in c.seeds)
            parts.append(
                f"{c.baseline}: {c.accuracy[0]:.2f}/{c.ece[0]:.2f}/{c.nll[0]:.3f} vs "
                f"{c.accuracy[1]:.2f}/{c.ece[1]:.2f}/{c.nll[1]:.3f} (seeds {seeds})"
            )
            ratios.append(f"{c.baseline}: {c.ece_ratio:.2f}")
        lines.append(
            f"| {t.task} | {t.status} | {'; '.join(parts)} | {'; '.join(ratios) or '–'} "
            f"| {'; '.join(t.reasons) or '–'} |"
        )
    return lines
