"""The training step in chunks of similar length (``--length-chunks``) against whole batches.

A training batch is padded to its longest example; on the paper's training sets under cloze
scoring a random batch of 8 runs 1.3-1.8x its real tokens through every adapted block.
``--length-chunks K`` forwards each micro-batch as K chunks of similar length with the same
summed loss (``blob_lora.tasks.dataset.split_by_length``; the gradient is the same to float
rounding, tested in ``tests/training/test_length_chunks.py``). This script measures what that
saves in ``blob-lora train``'s own loop: for LoRA and BLoB and each K of ``--chunks``, a loop is
built by ``prepare_training`` exactly as ``blob-lora train`` builds it (the regime table's
setting by default: ARC-Challenge, cloze scoring per character, max length 256, batch 8, LoRA
r=8 on q/v of the top 8 blocks + ``lm_head``, the frozen-prefix cache on) and stepped through
``TrainingLoop.steps()``. Every loop first takes one epoch of ``--n-train`` examples untimed
(the prefix features are then cached, as in every later epoch of a real run), then the loops
take their timed steps in turn, the order reversed every round so drift hits all alike.

Reported per method and K: the median step time, its ratio to K = 1 of the same method, and the
tokens (padding included) the adapted blocks ran over per step, counted by a hook on the top
block.

    OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/python bench/length_chunks.py
    .venv/bin/python bench/length_chunks.py --setting tiny          # seconds, random tiny model

Writes ``bench/out/length_chunks_<setting>.json`` and prints a Markdown table; ``--out`` writes
elsewhere (``--out bench/results/length_chunks_cpu.json`` for a run of record).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_table_options,
    ensure_src_on_path,
    format_table,
    positive_int,
    resolve_table_options,
    summary,
    write_report,
)

ensure_src_on_path()

from eval_cost import counted_blocks  # noqa: E402
from train_full_step import SETTINGS, Run, load_base, prepare, shape_targets  # noqa: E402

from blob_lora.training import TrainConfig  # noqa: E402

METHODS = ("lora", "blob")


def train_config(args: argparse.Namespace, method: str, chunks: int, out: Path, model: str,
                 num_layers: int, top_blocks: int, total_steps: int) -> TrainConfig:  # fmt: skip
    return TrainConfig(
        model=model,
        task=args.task,
        method=method,
        out=str(out / f"{method}-{chunks}"),
        data_root=args.data_root,
        train_split=f"train[:{args.n_train}]",
        max_steps=total_steps,
        batch_size=args.batch_size,
        length_chunks=chunks,
        max_length=args.max_length,
        scoring="cloze",
        length_norm=args.length_norm,
        target_modules=shape_targets("demo", num_layers, top_blocks),
        prefix_cache=True,
        evaluate=False,
        eval_tasks=[],
        seed=args.seed,
    )


def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    setting = SETTINGS[args.setting]
    torch.manual_seed(0)
    base, tokenizer = load_base(setting)
    num_layers = int(base.config.num_hidden_layers)
    warmup = -(-args.n_train // args.batch_size)  # one epoch: the prefix features cached
    total = warmup + args.steps
    labels = [(m, k) for m in METHODS for k in args.chunks]
    runs: dict[tuple[str, int], Run] = {}
    for method, chunks in labels:
        cfg = train_config(args, method, chunks, tmp, setting.model, num_layers,
                           setting.top_blocks, total)  # fmt: skip
        runs[(method, chunks)] = prepare(cfg, copy.deepcopy(base), tokenizer)
    del base
    gc.collect()
    for label, run in runs.items():
        for _ in range(warmup):
            run.step()
        print(f"  warm-up done: {label[0]} x{label[1]}", flush=True)
    times: dict[tuple[str, int], list[float]] = {label: [] for label in labels}
    with ExitStack() as hooks:  # the top block's positions, padding included, while timed
        counters = {
            label: hooks.enter_context(counted_blocks(run.loop.unwrapped))
            for label, run in runs.items()
        }
        for i in range(args.steps):
            order = labels if i % 2 == 0 else labels[::-1]
            for label in order:
                times[label].append(runs[label].step()[0])
            print(f"  round {i + 1}/{args.steps}: "
                  + ", ".join(f"{m} x{k} {times[(m, k)][-1]:.3f}s" for m, k in order), flush=True)  # fmt: skip
    rows = []
    for method, chunks in labels:
        stats = summary(times[(method, chunks)])
        ref = summary(times[(method, args.chunks[0])])["median"]
        rows.append({
            "method": method,
            "length_chunks": chunks,
            "step_s": stats,
            "times_s": times[(method, chunks)],
            "over_first": stats["median"] / ref,
            "top_tokens_per_step": counters[(method, chunks)]["top_tokens"] / args.steps,
        })  # fmt: skip
    for run in runs.values():
        run.steps.close()
        run.loop.bar.close()
    return {"warmup_steps": warmup, "rows": rows, "model": setting.model}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--chunks", type=positive_int, nargs="+", default=[1, 2, 4],
                   help="values of --length-chunks (the first is the reference)")  # fmt: skip
    p.add_argument("--task", default="arc_challenge")
    p.add_argument("--length-norm", default="char")
    p.add_argument("--n-train", type=positive_int, default=64, help="training examples (train[:N])")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per loop")
    add_table_options(p)
    args = p.parse_args(argv)
    resolve_table_options(args, SETTINGS["tiny"].max_length)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="length_chunks_") as tmp:
        result = bench(args, Path(tmp))
    out_path, report = write_report(args, "length_chunks", load_start, result)
    header = ["method", "length chunks", "s/step", "min-max", f"x chunks={args.chunks[0]}",
              "top-block tokens/step"]  # fmt: skip
    table = [
        [r["method"], r["length_chunks"], r["step_s"]["median"],
         f"{r['step_s']['min']:.3g}-{r['step_s']['max']:.3g}", round(r["over_first"], 3),
         round(r["top_tokens_per_step"])]
        for r in result["rows"]
    ]  # fmt: skip
    print(format_table(header, table))
    print(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
