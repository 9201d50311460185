"""What ``--gradient-checkpointing`` saves in memory and costs in time, LoRA and BLoB.

Activation checkpointing keeps each decoder block's input in the forward and runs the block
again in the backward, so the activations kept for the backward shrink from every block's
intermediate tensors to one tensor per block, for about one more forward per step. Here the four
arms (LoRA and BLoB, each without and with it) are trained by the real loop (``prepare_training``
and ``TrainingLoop.steps()``, as ``bench/train_full_step.py``), each on its own copy of the base
model, their steps interleaved in rotating order, and each measured one optimiser step at a
time: wall seconds, and the memory the step adds over what the process held before it
(``common.measure_peak_memory`` on the CPU: the process RSS sampled every 0.5 ms after returning
freed memory to the OS). CPU only: no GPU arm is written yet. The ``paper`` shape (q/v of
every block + ``lm_head``, no frozen prefix) is used: every block then keeps activations for the
backward, which is where checkpointing acts.

    OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/python bench/gradient_checkpointing.py
    .venv/bin/python bench/gradient_checkpointing.py --setting tiny      # seconds, random tiny model

Writes ``bench/out/gradient_checkpointing_<setting>.json`` and prints a Markdown table; ``--out``
writes elsewhere (``--out bench/results/gradient_checkpointing_cpu.json`` for a run of record).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, format_table, machine_info, measure_peak_memory, positive_int, summary  # noqa: E402
from train_full_step import SETTINGS, load_base, prepare, train_config  # noqa: E402

from blob_lora.utils.atomic import atomic_write_json  # noqa: E402

ARMS = [(m, gc) for m in ("lora", "blob") for gc in (False, True)]
CPU = torch.device("cpu")


def arm_name(method: str, checkpointing: bool) -> str:
    return f"{method} {'checkpointed' if checkpointing else 'plain'}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--scoring", choices=("letter", "cloze"), default="cloze")
    p.add_argument("--n-train", type=positive_int, default=80, help="training examples (train[:N])")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=None, help="default: the setting's")
    p.add_argument("--flipout", default="token")
    p.add_argument("--optimizer", default="paper")
    p.add_argument("--steps", type=positive_int, default=None, help="measured steps per arm")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setting = SETTINGS[args.setting]
    steps = args.steps or setting.steps
    load_start = list(os.getloadavg())
    base, tokenizer = load_base(setting)
    num_layers = base.config.num_hidden_layers
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp:
        for method, checkpointing in ARMS:
            cfg = train_config(
                args, setting, "paper", method, Path(tmp) / str(checkpointing), num_layers,
                total_steps=steps + 1,
            )  # fmt: skip
            cfg.loop = dataclasses.replace(cfg.loop, gradient_checkpointing=checkpointing)
            runs[arm_name(method, checkpointing)] = prepare(cfg, copy.deepcopy(base), tokenizer)
        del base
        checkpointed = {  # decoder blocks that run again in the backward
            name: sum(
                isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
                for m in run.loop.model.modules()
            )
            for name, run in runs.items()
        }
        for run in runs.values():  # warm-up: the first step allocates the optimiser states
            run.step()
        times: dict[str, list[float]] = {name: [] for name in runs}
        added: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for i in range(steps):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                wall: list[float] = []
                mem = measure_peak_memory(lambda r=runs[name], w=wall: w.append(r.step()[0]), CPU)
                times[name].append(wall[0])
                added[name].append((mem["peak_bytes"] - mem["before_bytes"]) / 2**20)
            print(f"round {i + 1}/{steps}", file=sys.stderr)

    result: dict[str, Any] = {}
    rows = []
    for method in ("lora", "blob"):
        plain, ckpt = arm_name(method, False), arm_name(method, True)
        for name in (plain, ckpt):
            t, m = summary(times[name]), summary(added[name])
            result[name] = {
                "step_s": t,
                "added_mib": m,
                "raw_s": times[name],
                "raw_mib": added[name],
                "blocks_checkpointed": checkpointed[name],
            }
            rows.append([
                name, f"{t['median']:.3f}", f"{t['median'] / summary(times[plain])['median']:.2f}",
                f"{m['median']:.0f}", f"{m['median'] / summary(added[plain])['median']:.2f}",
            ])  # fmt: skip
    header = ["arm", "s/step", "time x plain", "step adds MiB", "memory x plain"]
    print(format_table(header, rows))
    report = {
        "machine": machine_info(CPU),
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "config": {**vars(args), "steps": steps, "out": None, "shape": "paper"},
        "memory_kind": "cpu_rss_sampled (the step's peak over the RSS before it)",
        **result,
    }
    out = args.out or REPO / "bench" / "out" / f"gradient_checkpointing_{args.setting}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
