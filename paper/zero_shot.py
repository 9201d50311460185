"""Zero-shot accuracy of the base model under letter and cloze scoring (issue 19), measured on
held-out TRAINING examples of each task, never on an evaluation split.

For each task, the first ``--n`` examples of the seeded shuffle of its training split
(``train[:n]``; BoolQ: ``validation[:n]``, inside the ``validation[:2270]`` part the project
trains BoolQ on) are scored by the plain base model (no adapter) with every scoring: ``letter``
(the paper's), ``cloze`` and its length-normalised variants. Accuracy comes with its binomial
standard error; chance is 1/options. Writes ``<out>/zero_shot.json`` and ``<out>/zero_shot.md``.

``--on eval`` scores the evaluation splits the reproduction tables use instead (each task's
``eval`` split; BoolQ: ``validation[2270:]``, disjoint from its training part), so the base
model can stand beside the fine-tuned rows of the same table. That is a reported baseline, not
a choice: nothing is selected on it.

``--split`` scores that split of every task instead, for a choice that concerns tasks used
for training only: the ABMLL table's length normalisation was chosen on ``eval[:20]`` of the
MMLU subjects no seed holds out (its meta-train subjects; ``paper/abmll_tables.py --dry-run``
lists the held-out ones), ``results/zero_shot_mmlu/``.

    OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/python paper/zero_shot.py \
        --out results/zero_shot
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from blob_lora.evaluation.evaluate import evaluate_on_task
from blob_lora.methods import get_method
from blob_lora.models import load_model_and_tokenizer
from blob_lora.tasks import Scoring, get_task
from blob_lora.utils.atomic import atomic_write_json, atomic_write_text

TASKS = ("winogrande_s", "arc_challenge", "arc_easy", "winogrande_m", "openbookqa", "boolq")
SCORINGS = {
    "letter": Scoring("letter"),
    "cloze": Scoring("cloze"),
    "cloze-token": Scoring("cloze", "token"),
    "cloze-char": Scoring("cloze", "char"),
}


def held_out_split(task_name: str, n: int) -> str:
    """Held-out training examples: BoolQ's offline copy trains on validation[:2270]."""
    return f"validation[:{n}]" if task_name == "boolq" else f"train[:{n}]"


def table_eval_split(task_name: str) -> str:
    """The evaluation split of the reproduction tables (``paper_tables.yaml``): BoolQ's offline
    copy has no test labels, so it is evaluated on ``validation[2270:]``."""
    return "validation[2270:]" if task_name == "boolq" else "eval"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--scorings", nargs="+", default=list(SCORINGS), choices=list(SCORINGS))
    p.add_argument("--n", type=int, default=500, help="held-out training examples per task")
    p.add_argument(
        "--on",
        choices=("heldout", "eval"),
        default="heldout",
        help="held-out training examples (default) or the tables' full evaluation splits",
    )
    p.add_argument(
        "--split",
        default=None,
        help="score this split of every task instead of --on's (e.g. eval[:20] of a "
        "collection's meta-train tasks)",
    )
    p.add_argument("--max-length", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="paper/out/zero_shot")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)

    out = Path(args.out)
    model, tokenizer = load_model_and_tokenizer(args.model)
    method = get_method("lora")  # no adapter: one deterministic pass of the base model
    rows: list[dict[str, Any]] = []
    for name in args.tasks:
        task = get_task(name, data_root=args.data_root)
        if args.split is not None:
            split = args.split
        elif args.on == "heldout":
            split = held_out_split(name, args.n)
        else:
            split = table_eval_split(name)
        examples = task.load(split)
        chance = sum(1 / ex.n_options for ex in examples) / len(examples)
        labels = [ex.label for ex in examples]
        majority = max(labels.count(k) for k in set(labels)) / len(labels)
        for label in args.scorings:
            start = time.perf_counter()
            run = out / "runs" / name / label
            m = _finished(run, split, SCORINGS[label]) or evaluate_on_task(
                model,
                method,
                tokenizer,
                task,
                run,
                split=split,
                n_samples=0,
                max_length=args.max_length,
                batch_size=args.batch_size,
                scoring=SCORINGS[label],
            )
            acc, n = m["accuracy"], m["n_examples"]
            row = {
                "task": name,
                "split": split,
                "scoring": label,
                "n": int(n),
                "chance": chance,
                "majority": majority,
                "accuracy": acc,
                "accuracy_se": math.sqrt(acc * (1 - acc) / n),
                "ece": m["ece"],
                "nll": m["nll"],
                "seconds": m.get("eval_seconds", round(time.perf_counter() - start, 1)),
            }
            rows.append(row)
            print(
                f"{name:15s} {label:12s} acc {acc:.3f} ± {row['accuracy_se']:.3f}  "
                f"ece {m['ece']:.3f}  nll {m['nll']:.3f}  ({row['seconds']} s)",
                flush=True,
            )
    atomic_write_json(out / "zero_shot.json", {"model": args.model, "rows": rows})
    atomic_write_text(out / "zero_shot.md", render(rows, args.scorings))
    print(render(rows, args.scorings))
    return 0


def _finished(run: Path, split: str, scoring: Scoring) -> dict[str, Any] | None:
    """The metrics of an earlier, finished pass with the same split and scoring, so an
    interrupted measurement resumes where it stopped instead of starting over."""
    path = run / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    same = m.get("split") == split and m.get("scoring") == scoring.describe()
    return m if same else None


def render(rows: list[dict[str, Any]], scorings: list[str]) -> str:
    """Markdown: accuracy ± s.e. (ECE) per task (rows) and scoring (columns), with chance and
    the majority-class rate beside it (BoolQ's answers are not balanced)."""
    by = {(r["task"], r["scoring"]): r for r in rows}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = [
        "| task (split, n) | chance | majority | "
        + " | ".join(f"{s} ACC (ECE)" for s in scorings)
        + " |",
        "|---|---|---|" + "---|" * len(scorings),
    ]
    for t in tasks:
        first = next(r for r in rows if r["task"] == t)
        cells = []
        for s in scorings:
            r = by.get((t, s))
            cells.append(
                "–"
                if r is None
                else f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_se']:.1f} "
                f"({100 * r['ece']:.0f})"
            )
        head = (
            f"| {t} ({first['split']}, n={first['n']}) | {100 * first['chance']:.1f} | "
            f"{100 * first['majority']:.1f} | "
        )
        lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
