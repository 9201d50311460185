"""The whole training step of ``blob-lora train``, LoRA against BLoB, interleaved (issue 22).

``bench/train_step.py`` times the adapter inside a hand-written step; this script times the step
users actually run: the training loop of ``blob_lora.training.loop`` itself, built by
``prepare_training`` exactly as ``blob-lora train`` builds it (the task's tokenised split, the
seeded loader, the method's adapter, the optimisers of ``--optimizer``, the KL schedule, the
frozen-prefix cache, the train log) and driven one optimiser step at a time through
``TrainingLoop.steps()``. One step is everything between two optimiser steps: fetching and
collating the batch, the forward, the loss and KL, backward, the update (for BLoB in the default
``paper`` mode: AdamW, then SGD on ``pi * KL``), the schedulers, the logging record and its line
in the train log.

LoRA and BLoB each get their own copy of the base model and their own loop, both alive, and
their steps alternate (LoRA, BLoB, then BLoB, LoRA, ...), so drift of a shared machine hits both
alike. Reported: the median step time of each after the warm-up, and BLoB / LoRA as the ratio of
the medians (and the median of the per-round ratios). Two shapes (``--shapes``):

* ``demo``: LoRA r=8 on q/v of the top 8 blocks + ``lm_head`` (``blob-lora demo``'s targets),
  frozen-prefix cache on. The warm-up is one epoch, so the timed steps read cached features, as
  every epoch after the first does.
* ``paper``: q/v of every block + ``lm_head``, no prefix to cache.

    OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/python bench/train_full_step.py
    .venv/bin/python bench/train_full_step.py --setting tiny          # seconds, random tiny model

``--profile`` adds, per shape and method, a ``torch.profiler`` table of one more step (top
operators by self CPU time) next to the JSON as ``<out>.profile.txt``. Writes
``bench/out/train_full_step_<setting>.json`` and prints a Markdown table; ``--out`` writes
elsewhere (``--out bench/results/train_full_step_cpu.json`` for a run of record).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import REPO, ensure_src_on_path, format_table, machine_info, summary  # noqa: E402

ensure_src_on_path()

from blob_lora.methods import get_method  # noqa: E402
from blob_lora.training import TrainConfig  # noqa: E402
from blob_lora.training.trainer import RunStart, prepare_training  # noqa: E402
from blob_lora.utils.atomic import atomic_write_json, atomic_write_text  # noqa: E402

METHODS = ("lora", "blob")
SHAPES = ("demo", "paper")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Setting:
    model: str  # "smollm2-135m" (embedded GGUF) or "tiny" (random 2-block Llama, char tokenizer)
    top_blocks: int  # the demo shape's adapted blocks, counted from the top
    max_length: int
    warmup: int  # steps per method before timing in the paper shape (demo: one epoch)
    steps: int  # timed steps per method and shape


SETTINGS = {
    "cpu": Setting("smollm2-135m", 8, 96, 2, 10),
    # the char tokenizer spends a token per character: a longer budget keeps prompts whole
    "tiny": Setting("tiny", 1, 512, 1, 3),
}


def load_base(setting: Setting) -> tuple[nn.Module, Any]:
    if setting.model == "tiny":
        sys.path.insert(0, str(REPO))
        from tests.factories import tiny_base, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        base = tiny_base(tokenizer)
    else:
        from blob_lora.models import load_model_and_tokenizer

        base, tokenizer = load_model_and_tokenizer(setting.model, dtype=torch.float32)
    return base, tokenizer


def shape_targets(shape: str, num_layers: int, top_blocks: int) -> list[str]:
    """PEFT ``target_modules`` of a shape: ``paper`` q/v everywhere, ``demo`` the top blocks."""
    if shape == "paper":
        return ["q_proj", "v_proj", "lm_head"]
    blocks = "|".join(str(i) for i in range(num_layers - top_blocks, num_layers))
    return [rf".*\.layers\.({blocks})\.self_attn\.(q_proj|v_proj)|.*lm_head"]


def train_config(args: argparse.Namespace, setting: Setting, shape: str, method: str, out: Path,
                 num_layers: int, total_steps: int) -> TrainConfig:  # fmt: skip
    return TrainConfig(
        model=setting.model,
        task=args.task,
        method=method,
        out=str(out / shape / method),
        data_root=args.data_root,
        train_split=f"train[:{args.n_train}]",
        max_steps=total_steps,
        batch_size=args.batch_size,
        max_length=args.max_length or setting.max_length,
        scoring=args.scoring,
        flipout=args.flipout,
        optimizer=args.optimizer,
        kl_rescale=False,  # the demo's cycle (one epoch): pi varies over the timed steps
        target_modules=shape_targets(shape, num_layers, setting.top_blocks),
        prefix_cache=shape == "demo",
        evaluate=False,
        eval_tasks=[],
        seed=args.seed,
    )


@dataclass
class Run:
    """One method's prepared training loop on its own copy of the base model."""

    loop: Any
    steps: Iterator[int]

    def step(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one optimiser step."""
        start, cpu = time.perf_counter(), time.process_time()
        next(self.steps)
        return time.perf_counter() - start, time.process_time() - cpu


def prepare(cfg: TrainConfig, base: nn.Module, tokenizer: Any) -> Run:
    start = RunStart(overwrite=True, progress=False, base_model=base, tokenizer=tokenizer)
    prepared = prepare_training(cfg, get_method(cfg.method), start)
    loop = prepared.loop
    loop.start(False, prepared.inputs.dataset, False)
    return Run(loop, loop.steps())


#: profiler rows summed per method: the trainer's section labels and BLoB's noise path
SECTIONS = (
    "train.forward",
    "train.backward",
    "train.update",
    "train.update.kl",
    "train.kl",
    "train.log",
    "_TokenFlipout",
    "_TokenFlipoutBackward",
    "aten::random_",
)


def profile_step(run: Run, rows: int = 30) -> tuple[str, dict[str, float]]:
    """One more step under ``torch.profiler``: its top operators by self CPU time, and the CPU
    milliseconds of each of ``SECTIONS`` (total, i.e. with what runs inside; ``aten::random_``:
    self) plus the whole profiled step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall, _ = run.step()
    events = prof.key_averages()
    by_key = {e.key: e for e in events}
    sections = {"step (wall, profiled)": wall * 1e3}
    for key in SECTIONS:
        event = by_key.get(key)
        if event is not None:
            total = event.self_cpu_time_total if key.startswith("aten::") else event.cpu_time_total
            sections[key] = total / 1e3
    table = events.table(sort_by="self_cpu_time_total", row_limit=rows)
    return table, sections


def bench_shape(args: argparse.Namespace, setting: Setting, shape: str, base: nn.Module,
                tokenizer: Any, out: Path) -> tuple[dict[str, Any], dict[str, str]]:  # fmt: skip
    num_layers = int(base.config.num_hidden_layers)
    steps_per_epoch = -(-args.n_train // args.batch_size)
    if args.warmup is not None:
        warmup = args.warmup
    else:
        warmup = steps_per_epoch if shape == "demo" else setting.warmup
    steps = args.steps or setting.steps
    total = warmup + steps + (1 if args.profile else 0)
    runs: dict[str, Run] = {}
    for method in METHODS:
        cfg = train_config(args, setting, shape, method, out, num_layers, total)
        runs[method] = prepare(cfg, copy.deepcopy(base), tokenizer)
    prefix_blocks = {m: (r.loop.prefix.start if r.loop.prefix else 0) for m, r in runs.items()}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu_times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(warmup + steps):
        order = METHODS if i % 2 == 0 else METHODS[::-1]
        took = {}
        for method in order:
            took[method] = runs[method].step()
            if i >= warmup:
                times[method].append(took[method][0])
                cpu_times[method].append(took[method][1])
        what = "warm-up" if i < warmup else "timed"
        print(f"  {shape} step {i + 1}/{warmup + steps} ({what}): "
              + ", ".join(f"{m} {took[m][0]:.3f}s wall {took[m][1]:.3f}s cpu" for m in order),
              flush=True)  # fmt: skip
    profiled = {m: profile_step(r) for m, r in runs.items()} if args.profile else {}
    profiles = {m: table for m, (table, _) in profiled.items()}
    stats = {m: summary(t) for m, t in times.items()}
    cpu_stats = {m: summary(t) for m, t in cpu_times.items()}
    per_round = [b / lo for lo, b in zip(times["lora"], times["blob"], strict=True)]
    row = {
        "shape": shape,
        "target_modules": runs["blob"].loop.cfg.lora.target_modules,
        "prefix_cached_blocks": prefix_blocks,
        "warmup_steps": warmup,
        "step_s": stats,
        "cpu_s": cpu_stats,
        "times_s": times,
        "cpu_times_s": cpu_times,
        "blob_over_lora": stats["blob"]["median"] / stats["lora"]["median"],
        "blob_over_lora_per_round_median": statistics.median(per_round),
        "blob_over_lora_cpu": cpu_stats["blob"]["median"] / cpu_stats["lora"]["median"],
    }
    if profiled:
        row["profile_sections_ms"] = {m: sections for m, (_, sections) in profiled.items()}
    # what the loop did: its steps, their lines in the train log, the KL it logged
    logs = {m: _train_log(r.loop.log_path) for m, r in runs.items()}
    row["steps_taken"] = {m: r.loop.step for m, r in runs.items()}
    row["logged_steps"] = {m: [rec["step"] for rec in log] for m, log in logs.items()}
    row["kl_logged"] = {m: all(rec["kl"] is not None for rec in log) for m, log in logs.items()}
    for run in runs.values():
        run.steps.close()
        run.loop.bar.close()
    del runs
    gc.collect()
    return row, profiles


def _train_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--scoring", choices=("letter", "cloze"), default="letter")
    p.add_argument(
        "--n-train", type=common.positive_int, default=80, help="training examples (train[:N])"
    )
    p.add_argument("--batch-size", type=common.positive_int, default=8)
    p.add_argument(
        "--max-length",
        type=common.positive_int,
        default=None,
        help="token budget (default per setting)",
    )
    p.add_argument("--flipout", default="token", help="BLoB's training noise (default token)")
    p.add_argument("--optimizer", default="paper", help="paper (default) or single")
    p.add_argument("--warmup", type=common.natural_int, default=None,
                   help="untimed steps per method (default: one epoch for demo, else per setting)")  # fmt: skip
    p.add_argument("--steps", type=common.positive_int, default=None, help="timed steps per method")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-root", default=None, help="offline datasets (else BLOB_LORA_DATA)")
    p.add_argument("--profile", action="store_true", help="profile one more step per method")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setting = SETTINGS[args.setting]
    out_path = args.out or REPO / "bench" / "out" / f"train_full_step_{args.setting}.json"
    load_start = list(os.getloadavg())
    torch.manual_seed(0)
    base, tokenizer = load_base(setting)
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory(prefix="train_full_step_") as tmp:
        for shape in args.shapes:
            print(f"== {shape} shape", flush=True)
            row, prof = bench_shape(args, setting, shape, base, tokenizer, Path(tmp))
            rows.append(row)
            profiles.update({f"{shape}/{m}": t for m, t in prof.items()})
    # no output path in the report (it may be a path of this machine)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["max_length"] = args.max_length or setting.max_length
    config["model"] = setting.model
    # other jobs on the machine inflate wall times: the load average says how busy it was
    load = {"start": load_start, "end": list(os.getloadavg())}
    report = {"machine": machine_info(CPU), "load_average": load, "config": config, "rows": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, report)
    if profiles:
        text = "\n\n".join(f"== {k}\n{t}" for k, t in profiles.items())
        atomic_write_text(out_path.with_suffix(".profile.txt"), text)
    header = ["shape", "LoRA s/step", "min-max", "BLoB s/step", "min-max", "BLoB / LoRA",
              "per-round ratio", "LoRA CPU s", "BLoB CPU s", "CPU ratio"]  # fmt: skip
    table = []
    for r in rows:
        lo, bl = r["step_s"]["lora"], r["step_s"]["blob"]
        table.append([
            r["shape"], lo["median"], f"{lo['min']:.3g}-{lo['max']:.3g}", bl["median"],
            f"{bl['min']:.3g}-{bl['max']:.3g}", round(r["blob_over_lora"], 3),
            round(r["blob_over_lora_per_round_median"], 3), r["cpu_s"]["lora"]["median"],
            r["cpu_s"]["blob"]["median"], round(r["blob_over_lora_cpu"], 3),
        ])  # fmt: skip
    print(format_table(header, table))
    for r in rows:
        if "profile_sections_ms" in r:
            sec = r["profile_sections_ms"]
            keys = [
                k for k in ("step (wall, profiled)", *SECTIONS) if any(k in v for v in sec.values())
            ]
            print(
                f"\nprofiled step, {r['shape']} shape (CPU ms; sections include their inner ones)"
            )
            print(format_table(["section", *METHODS],
                               [[k, *(round(sec[m].get(k, 0.0), 1) for m in METHODS)] for k in keys]))  # fmt: skip
    print(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
