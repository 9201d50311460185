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

The rule is parameterised (candidate, baselines, accuracy margin, tasks needed) so the same
code can check e.g. BLoB-mean, but the defaults are the issue's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from blob_lora.comparison.tables import mean_std

PASS, FAIL, PENDING = "pass", "fail", "pending"


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

    @property
    def passed(self) -> int:
        return sum(t.status == PASS for t in self.tasks)

    @property
    def pending(self) -> int:
        return sum(t.status == PENDING for t in self.tasks)

    @property
    def complete(self) -> bool:
        return all(c.seeds == self.seeds for t in self.tasks for c in t.comparisons) and bool(
            self.seeds
        )

    @property
    def outcome(self) -> str:
        """'reproduced' / 'not reproduced' on complete results, else 'undecided'."""
        if not self.complete:
            return "undecided"
        return "reproduced" if self.passed >= self.needed else "not reproduced"


def per_seed_metrics(compare: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, float]]:
    """``(column, task, seed) -> metrics`` for in-distribution evaluations (a run's own task)."""
    out: dict[tuple[str, str, int], dict[str, float]] = {}
    for run in compare.get("runs", []):
        for column, by_task in (run.get("evaluations") or {}).items():
            metrics = by_task.get(run["task"])
            if metrics is not None:
                out[(column, run["task"], int(run["seed"]))] = metrics
    return out


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
) -> Verdict:
    """The criterion over ``tasks`` (default: the compare's in-distribution tasks)."""
    if tasks is None:
        tasks = (compare.get("id") or {}).get("tasks") or compare["spec"]["tasks"]
    metrics = per_seed_metrics(compare)
    verdicts = []
    for task in tasks:
        comps = [compare_on_task(metrics, candidate, b, task) for b in baselines]
        reasons = [r for c in comps if c.ran for r in c.reasons(max_accuracy_drop)]
        if reasons:
            status = FAIL  # on the seeds finished so far
        elif all(c.ran for c in comps):
            status = PASS
        else:
            status = PENDING
        verdicts.append(TaskVerdict(task, status, comps, reasons))
    seeds = tuple(sorted(int(s) for s in compare.get("spec", {}).get("seeds", ())))
    return Verdict(candidate, tuple(baselines), verdicts, needed, max_accuracy_drop, seeds)


def render_markdown(verdict: Verdict) -> str:
    """A section for results/: one row per task, every number the verdict rests on."""
    base = " and ".join(f"`{b}`" for b in verdict.baselines)
    lines = [
        f"# Criterion: `{verdict.candidate}` vs {base}",
        "",
        f"Pass on a task: lower ECE **and** lower NLL than each of {base}, accuracy at most "
        f"{verdict.max_accuracy_drop:g} points lower; each comparison averages only the seeds "
        f"both methods finished. Needed: {verdict.needed} of {len(verdict.tasks)} tasks.",
        "",
        f"**Outcome: {verdict.outcome}** ({verdict.passed} pass, {verdict.pending} pending, "
        f"{len(verdict.tasks) - verdict.passed - verdict.pending} fail"
        + ("" if verdict.complete else "; not every seed of every method has finished")
        + ").",
        "",
        "| task | status | comparison (ACC % / ECE % / NLL, candidate vs baseline, seeds) | why not |",
        "|---|---|---|---|",
    ]
    for t in verdict.tasks:
        parts = []
        for c in t.comparisons:
            if not c.ran:
                parts.append(f"{c.baseline}: not run")
                continue
            seeds = ",".join(str(s) for s in c.seeds)
            parts.append(
                f"{c.baseline}: {c.accuracy[0]:.2f}/{c.ece[0]:.2f}/{c.nll[0]:.3f} vs "
                f"{c.accuracy[1]:.2f}/{c.ece[1]:.2f}/{c.nll[1]:.3f} (seeds {seeds})"
            )
        lines.append(
            f"| {t.task} | {t.status} | {'; '.join(parts)} | {'; '.join(t.reasons) or '–'} |"
        )
    return "\n".join(lines) + "\n"
