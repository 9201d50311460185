"""One ``compare`` process with every thread, or one process per core: which does more work?

``blob-lora compare`` may run as several processes on one experiment (``blob_lora.comparison
.claims``). This script measures whether that pays on this machine, on the two kinds of work a
table is made of, each done by an existing benchmark run as a child process:

* ``train``: training steps of the table's shape (``bench/train_full_step.py --shapes demo``:
  LoRA r=8 on q/v of the top 8 blocks + head, frozen-prefix cache, cloze scoring; LoRA and
  BLoB steps interleaved);
* ``eval``: evaluation passes (``bench/eval_cost.py``: LoRA and BLoB N = 10, cloze).

Each workload runs once alone with ``--threads`` threads (``OMP_NUM_THREADS``), then as
``--workers`` copies at the same moment with ``threads / workers`` threads each. Reported per
workload and arrangement: the child's own median seconds per unit (a step, a question) for
LoRA and BLoB, and the throughput, units per second of all children together. The ratio of the
throughputs is the gain (above 1: the parallel processes do more work per second). Per-unit
medians come from the children's timed phases, which overlap when the copies start together;
the whole-job wall times (loading and warm-up included, as in a real table) are reported too:
``workers x alone / together`` is the end-to-end gain.

    BLOB_LORA_DATA=../shared/data .venv/bin/python bench/compare_workers.py
    .venv/bin/python bench/compare_workers.py --setting tiny          # seconds, random tiny model

Writes ``bench/out/compare_workers_<setting>.json`` and prints a Markdown table; ``--out`` writes
elsewhere (``--out bench/results/compare_workers_cpu.json`` for a run of record).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ensure_src_on_path, format_table, machine_info, positive_int  # noqa: E402

ensure_src_on_path()

from blob_lora.utils.atomic import atomic_write_json  # noqa: E402

BENCH = Path(__file__).resolve().parent
METHODS = ("lora", "blob")


def workload_command(kind: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The child benchmark of one workload, writing its JSON to ``out``."""
    common = ["--setting", args.setting, "--task", args.task, "--scoring", "cloze"]
    if kind == "train":
        cmd = [str(BENCH / "train_full_step.py"), *common, "--shapes", "demo"]
        cmd += ["--steps", str(args.train_steps)]
    else:
        cmd = [str(BENCH / "eval_cost.py"), *common, "--methods", *METHODS, "--no-memory"]
        cmd += ["--n-questions", str(args.eval_questions), "--repeats", "2"]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    return [sys.executable, *cmd, "--out", str(out)]


def per_unit_seconds(kind: str, result: dict[str, Any]) -> dict[str, float]:
    """Median wall seconds per step (train) or per question (eval), per method."""
    if kind == "train":
        row = result["rows"][0]
        return {m: row["step_s"][m]["median"] for m in METHODS}
    return {r["method"]: r["per_question_s"]["pred_wall"] for r in result["rows"]}


def run_children(kind: str, args: argparse.Namespace, n: int, threads: int, tmp: Path):
    """``n`` copies of the workload started together; their results and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    outs = [tmp / f"{kind}_{n}_{i}.json" for i in range(n)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            workload_command(kind, args, out),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    walls = []
    for p in procs:
        _, err = p.communicate()
        walls.append(time.perf_counter() - start)
        if p.returncode != 0:
            raise SystemExit(f"{kind} child failed:\n{err[-3000:]}")
    return [json.loads(o.read_text()) for o in outs], walls


def measure(kind: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    arrangements = [(1, args.threads), (args.workers, max(1, args.threads // args.workers))]
    for n, threads in arrangements:
        print(f"{kind}: {n} process(es) x {threads} thread(s) ...", flush=True)
        results, walls = run_children(kind, args, n, threads, tmp)
        per_unit = [per_unit_seconds(kind, r) for r in results]
        rows.append(
            {
                "workload": kind,
                "processes": n,
                "threads_each": threads,
                "per_unit_s": per_unit,
                # every child does the same work: units per second of all children together
                "throughput": {m: sum(1.0 / u[m] for u in per_unit) for m in METHODS},
                "job_wall_s": walls,
            }
        )
    alone, together = rows
    for m in METHODS:
        together.setdefault("gain", {})[m] = together["throughput"][m] / alone["throughput"][m]
    together["job_gain"] = args.workers * alone["job_wall_s"][0] / max(together["job_wall_s"])
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    header = ["workload", "processes x threads", "LoRA s/unit", "BLoB s/unit",
              "LoRA units/s", "BLoB units/s", "gain LoRA", "gain BLoB", "job wall s",
              "job gain"]  # fmt: skip
    body = []
    for r in rows:
        gain = r.get("gain", {})
        body.append(
            [
                r["workload"],
                f"{r['processes']} x {r['threads_each']}",
                " / ".join(f"{u['lora']:.3g}" for u in r["per_unit_s"]),
                " / ".join(f"{u['blob']:.3g}" for u in r["per_unit_s"]),
                f"{r['throughput']['lora']:.3g}",
                f"{r['throughput']['blob']:.3g}",
                f"{gain['lora']:.2f}" if gain else "1",
                f"{gain['blob']:.2f}" if gain else "1",
                " / ".join(f"{w:.0f}" for w in r["job_wall_s"]),
                f"{r['job_gain']:.2f}" if "job_gain" in r else "1",
            ]
        )
    return format_table(header, body)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", choices=("cpu", "tiny"), default="cpu")
    p.add_argument("--workloads", nargs="+", choices=("train", "eval"), default=["train", "eval"])
    p.add_argument("--task", default="arc_challenge")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                   help="threads of the single process (default: the cores)")  # fmt: skip
    p.add_argument("--workers", type=positive_int, default=None,
                   help="parallel processes (default: --threads, one thread each)")  # fmt: skip
    p.add_argument("--train-steps", type=positive_int, default=8, help="timed steps per child")
    p.add_argument("--eval-questions", type=positive_int, default=48, help="questions per child")
    p.add_argument("--data-root", default=None, help="offline datasets (else BLOB_LORA_DATA)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.workers = args.workers or args.threads
    if args.workers < 2:
        p.error("needs at least 2 workers to compare against one process")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or BENCH / "out" / f"compare_workers_{args.setting}.json"
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for kind in args.workloads for row in measure(kind, args, Path(tmp))]
    table = render(rows)
    print(table)
    payload = {
        "machine": machine_info(torch.device("cpu")),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    atomic_write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
