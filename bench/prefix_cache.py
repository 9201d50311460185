"""What the frozen-prefix cache saves: training step and evaluation, cached vs full forward.

With LoRA on the top blocks only, the blocks below never change; ``blob_lora.models.
prefix_cache`` runs them once per example. This script times, on real task batches, one
training step (forward + backward, LoRA and BLoB), one deterministic evaluation pass and one
BLoB N=10 predictive (samples folded into the batch), each with and without the cache, in the
same process and interleaved, and reports the ratio full / cached. The one-off cost of filling
the cache (a forward through the frozen blocks) is reported per example.

    OMP_NUM_THREADS=2 .venv/bin/python bench/prefix_cache.py --data-root ../shared/data

Writes ``bench/out/prefix_cache.json`` (``--out``). Defaults: embedded SmolLM2-135M, the
demo's targets (q/v of blocks 22-29 + lm_head), OBQA and BoolQ validation batches of 8.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ensure_src_on_path, machine_info, positive_int, summary, timed  # noqa: E402

ensure_src_on_path()

from blob_lora.cli.demo import DEMO_TARGETS  # noqa: E402
from blob_lora.methods import get_method  # noqa: E402
from blob_lora.models import load_model_and_tokenizer  # noqa: E402
from blob_lora.models.forward import answer_logits  # noqa: E402
from blob_lora.models.prefix_cache import PrefixFeatureCache  # noqa: E402
from blob_lora.tasks import MCCollator, MCDataset, get_task, option_token_ids  # noqa: E402
from blob_lora.tasks.dataset import IndexedCollator, IndexedDataset  # noqa: E402
from blob_lora.training.config import TrainConfig  # noqa: E402
from blob_lora.utils.atomic import atomic_write_json  # noqa: E402


def _batch(tokenizer: Any, task_name: str, args: argparse.Namespace):
    task = get_task(task_name, data_root=args.data_root)
    dataset = MCDataset(task, f"validation[:{args.batch_size}]", tokenizer, args.max_length)
    collate = IndexedCollator(MCCollator(tokenizer.pad_token_id, task.n_options))
    indexed = IndexedDataset(dataset)
    batch = collate([indexed[i] for i in range(len(indexed))])
    index = batch.pop("index")
    return dataset, batch, index, option_token_ids(tokenizer, task)


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    device = torch.device("cpu")
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return times


def _task_rows(method_name: str, model: Any, tokenizer: Any, task_name: str, args) -> list:
    method = get_method(method_name)
    dataset, batch, index, option_ids = _batch(tokenizer, task_name, args)
    cache = PrefixFeatureCache.for_dataset(model, dataset)
    if cache is None:
        raise SystemExit(f"no frozen prefix with targets {args.targets!r}")
    model.eval()
    fill = timed(lambda: cache.output_for(model, batch, index), torch.device("cpu"))

    def step(cached: bool) -> None:
        model.train()
        with cache.injected(model, batch, index) if cached else nullcontext():
            logits = answer_logits(model, batch, option_ids)
        F.cross_entropy(logits, batch["labels"]).backward()
        model.zero_grad(set_to_none=True)

    n = 10 if method_name == "blob" else 0

    def predict(cached: bool) -> None:
        with cache.injected(model, batch, index) if cached else nullcontext():
            method.predict_samples(model, batch, option_ids, n, fold=n)

    rows = []
    for kind, fn in {"train step": step, f"predict N={n}": predict}.items():
        times = _interleaved(
            {"full": lambda fn=fn: fn(False), "cached": lambda fn=fn: fn(True)}, args.repeats
        )
        full, cached = summary(times["full"]), summary(times["cached"])
        rows.append(
            {
                "method": method_name,
                "task": task_name,
                "what": kind,
                "tokens": list(batch["input_ids"].shape),
                "full_s": full,
                "cached_s": cached,
                "speedup": full["median"] / cached["median"],
                "fill_s_per_example": fill / len(index),
                "frozen_blocks": cache.start,
            }
        )
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    base, tokenizer = load_model_and_tokenizer(args.model)
    cfg = TrainConfig(target_modules=[args.targets], lora_r=8, lora_alpha=16)
    rows = []
    for method_name in ("lora", "blob"):
        torch.manual_seed(0)
        model = get_method(method_name).build(base, cfg)
        for task_name in args.tasks:
            rows += _task_rows(method_name, model, tokenizer, task_name, args)
        base = model.unload()  # the same base for the next method
    return {
        "machine": machine_info(torch.device("cpu")),
        "config": {
            "model": args.model,
            "targets": args.targets,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "repeats": args.repeats,
            "frozen_blocks": rows[0]["frozen_blocks"],
        },
        "rows": rows,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        "| method | task | measured | batch x tokens | full (s) | cached (s) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        b, t = r["tokens"]
        lines.append(
            f"| {r['method']} | {r['task']} | {r['what']} | {b} x {t} | "
            f"{r['full_s']['median']:.3f} | {r['cached_s']['median']:.3f} | "
            f"{r['speedup']:.2f}x |"
        )
    fills = {r["task"]: r["fill_s_per_example"] for r in report["rows"]}
    lines.append("")
    lines.append(
        "one-off fill (frozen blocks once per example): "
        + ", ".join(f"{k} {v:.3f} s/example" for k, v in fills.items())
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--targets", default=DEMO_TARGETS, help="LoRA target regex (top blocks)")
    p.add_argument("--tasks", nargs="+", default=["openbookqa", "boolq"])
    p.add_argument("--data-root", default=os.environ.get("BLOB_LORA_DATA"))
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=256)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "prefix_cache.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = measure(args)
    atomic_write_json(args.out, report)
    print(table(report))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
