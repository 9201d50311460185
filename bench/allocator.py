"""What glibc's handling of large blocks costs the CLI on CPU, and what keeping them saves.

By default glibc serves every block above its mmap threshold (at most 32 MiB, raised
dynamically from 128 KiB) with a fresh ``mmap`` and unmaps it on free, so each large tensor of
every step (the output head's vocabulary-wide logits, N = 10 samples folded into a batch) is
paid for again in page faults: the kernel zeroes every 4 KiB page the first time it is touched.
A table run on this machine spent 15 % of its CPU time in the kernel that way (``/proc``
``stime`` of the compare process). ``MALLOC_MMAP_MAX_=0`` makes glibc serve those blocks from
its heap, and ``MALLOC_TRIM_THRESHOLD_`` (here 2 GiB) keeps freed memory there for the next
step instead of returning it; the same blocks are then reused without faults. Nothing is
computed differently, only where the memory comes from.

This script runs the same two commands of the CLI as separate processes under both
environments, alternating the order per repetition (glibc first, then kept; then kept first),
and reads each child's own resource usage from ``wait4``: user and system CPU seconds, minor
page faults, peak RSS, and wall seconds.

* ``train``: ``blob-lora train``, BLoB, the regime table's setting (ARC-Easy, cloze per token,
  batch 8 in 4 length chunks, LoRA on q/v of the top 8 blocks + head, frozen-prefix cache
  warmed first), ``--steps`` optimiser steps, no checkpoints, a 2-question evaluation;
* ``evaluate``: ``blob-lora evaluate`` of that run with N = 10 samples on ``--questions``
  ARC-Easy validation questions (folded into the batch, the default).

CPU seconds are the steadier measure on a shared machine (wall time moves with the other
load); user seconds still move with the caches another process shares, the system seconds
and faults hardly do.

    OMP_NUM_THREADS=1 BLOB_LORA_DATA=../shared/data .venv/bin/python bench/allocator.py

Writes ``bench/out/allocator_cpu.json`` (``--out bench/results/allocator_cpu.json`` for a
run of record) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, format_table, positive_int, summary  # noqa: E402

#: the environment each mode adds to the child's (glibc's defaults: nothing added)
MODES: dict[str, dict[str, str]] = {
    "glibc default": {},
    "kept (mmap off)": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)},
}
TARGETS = r".*\.layers\.(2[2-9])\.self_attn\.(q_proj|v_proj)|.*lm_head"


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("blob-lora")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "blob_lora.cli.main"]


def train_command(out: Path, cache: Path, steps: int) -> list[str]:
    return [
        *cli(), "train", "--no-progress", "--method", "blob", "--model", "smollm2-135m",
        "--task", "arc_easy", "--scoring", "cloze", "--length-norm", "token",
        "--max-steps", str(steps), "--batch-size", "8", "--length-chunks", "4",
        "--lr", "3e-4", "--max-length", "256", "--target-modules", TARGETS,
        "--eval-split", "validation[:2]", "--eval-samples", "2", "--cache-dir", str(cache),
        "--checkpoint-every", "0", "--seed", "1", "--out", str(out), "--overwrite",
    ]  # fmt: skip


def evaluate_command(run: Path, out: Path, questions: int) -> list[str]:
    return [
        *cli(), "evaluate", "--no-progress", "--run", str(run), "--task", "arc_easy",
        "--split", f"validation[:{questions}]", "--eval-samples", "10", "--out", str(out),
    ]  # fmt: skip


def measured(command: list[str], extra_env: dict[str, str]) -> dict[str, float]:
    """Run ``command`` as a child with ``extra_env`` added; its own rusage and wall time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(extra_env)
    # stderr to a file, not a pipe: a child writing more than the pipe holds would block
    # while this process waits in wait4 without reading
    with tempfile.TemporaryFile() as err_file:
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err_file)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err_file.seek(0)
            err = err_file.read().decode(errors="replace")
            raise SystemExit(f"{' '.join(command[:3])} failed ({proc.returncode}):\n{err[-2000:]}")
    return {
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "minor_faults": float(usage.ru_minflt),
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive_int, default=40, help="training steps per train run")
    p.add_argument("--questions", type=positive_int, default=48, help="questions per evaluation")
    p.add_argument("--repeats", type=positive_int, default=2, help="repetitions of both modes")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "allocator_cpu.json")
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("glibc's allocator settings: Linux only")

    load_start = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="allocator-"))
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        cache = work / "cache"
        # untimed: the frozen-prefix features and a run to evaluate, made once
        measured(train_command(work / "run", cache, 1), {})
        names = list(MODES)
        for rep in range(args.repeats):
            for mode in names if rep % 2 == 0 else names[::-1]:
                env = MODES[mode]
                train = measured(train_command(work / "t", cache, args.steps), env)
                samples.setdefault(("train", mode), []).append(train)
                ev = measured(evaluate_command(work / "run", work / "e", args.questions), env)
                samples.setdefault(("evaluate", mode), []).append(ev)
                shutil.rmtree(work / "e", ignore_errors=True)
                print(f"repeat {rep + 1} {mode}: train {train['cpu_s']:.1f} CPU s, "
                      f"evaluate {ev['cpu_s']:.1f} CPU s", file=sys.stderr)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows, result = [], {}
    for (workload, mode), runs in samples.items():
        med = {k: summary([r[k] for r in runs])["median"] for k in runs[0]}
        base = {
            k: summary([r[k] for r in samples[(workload, "glibc default")]])["median"]
            for k in runs[0]
        }
        result.setdefault(workload, {})[mode] = {"median": med, "runs": runs}
        rows.append([
            workload, mode, f"{med['user_s']:.1f}", f"{med['sys_s']:.1f}", f"{med['cpu_s']:.1f}",
            f"{med['cpu_s'] / base['cpu_s']:.2f}", f"{med['minor_faults'] / 1e6:.2f}",
            f"{med['peak_rss_mib']:.0f}", f"{med['wall_s']:.1f}",
        ])  # fmt: skip
    header = ["workload", "allocator", "user s", "sys s", "CPU s", "CPU x default",
              "faults (M)", "peak RSS MiB", "wall s"]  # fmt: skip
    print(format_table(header, rows))

    from common import ensure_src_on_path, machine_info

    ensure_src_on_path()
    import torch

    from blob_lora.utils.atomic import atomic_write_json

    report: dict[str, Any] = {
        "machine": machine_info(torch.device("cpu")),
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "config": {
            "steps": args.steps,
            "questions": args.questions,
            "repeats": args.repeats,
            "modes": MODES,
        },  # fmt: skip
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
