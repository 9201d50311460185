"""Benchmark the predictive modes of ``blob_lora.prediction.fast`` against one plain LoRA pass.

Two settings:

* ``cpu`` (default): SmolLM2-135M with a trained BLoB adapter (``--run RUN_DIR``, e.g.
  ``runs/demo/blob`` from ``blob-lora demo``; without it a tiny adapter is trained first), on a
  real validation slice. Every batch runs every mode in turn (interleaved, so machine drift
  hits all alike); reported per mode: latency (median seconds per batch), examples/s, cost as a
  multiple of one plain LoRA pass, and ACC / ECE / NLL / AURC of the resulting predictive,
  compared with the full N = 10 predictive (``fold``).
* ``gpu``: a randomly initialised LLaMA-2-7B-shaped Llama in bf16 on CUDA, LoRA r=8 on
  q_proj, v_proj, lm_head, random inputs (batch 4 x 300 tokens); latency only. BLoB on every
  LoRA layer (the paper) and on the last k blocks + head only (where prefix reuse applies).
  ``--tiny-shape --device cpu`` runs the same code path on a tiny config (tests use it).

Targets (issue 8): a mode with ECE within 1 point and NLL within 0.02 of full N = 10 at
<= 3x one LoRA forward; full N = 10 at <= 10.1x.

Run ``--help`` for the options; ``bench/README.md`` has command lines and measured tables.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LLAMA2_7B_SHAPE,
    REPO,
    ensure_src_on_path,
    format_table,
    machine_info,
    measure_peak_memory,
    natural_int,
    positive_int,
    random_llama,
    release_device_memory,
    synchronize,
)

ensure_src_on_path()

from blob_lora.cli.demo import DEMO_TARGETS  # noqa: E402
from blob_lora.models.forward import answer_logits  # noqa: E402
from blob_lora.prediction.fast import (  # noqa: E402
    EarlyStop,
    predict_batch,
    resolve_mode,
)
from blob_lora.tuners.blob import sampling  # noqa: E402
from blob_lora.utils.atomic import atomic_write_json  # noqa: E402

TARGETS = ["q_proj", "v_proj", "lm_head"]
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}
ECE_TOL, NLL_TOL, FAST_COST, FULL_COST = 0.01, 0.02, 3.0, 10.1


@dataclass(frozen=True)
class Spec:
    """One row of the table: ``mode`` is ``lora`` (the reference pass) or a predictive mode."""

    mode: str
    n: int = 0
    early: EarlyStop | None = None
    seed_offset: int = 0  # > 0: other weight noise (the Monte-Carlo noise floor of a mode)

    @property
    def name(self) -> str:
        if self.seed_offset:
            return f"{self.mode} N={self.n}, other noise"
        if self.mode == "lora":
            return "lora (1 pass)"
        if self.mode == "mean":
            return "mean (N=0)"
        label = (
            f"{self.mode} N={self.n}" if "early" not in self.mode else f"{self.mode} N<={self.n}"
        )
        if self.early is not None:
            label += f" tol={self.early.tol:g}"
        return label


def parse_specs(texts: Sequence[str], n: int, rule: EarlyStop) -> list[Spec]:
    """``lora``, ``mean``, ``fold:10``, ``prefix:4``, ``early:10``, ``prefix-early:10@0.02``;
    a trailing ``~`` (``fold:10~``) draws other noise than the same mode without it."""
    specs = [Spec("lora")]
    for text in texts:
        other = text.endswith("~")
        mode, _, rest = text.rstrip("~").partition(":")
        count, _, tol = rest.partition("@")
        if mode == "lora":
            continue
        k = int(count) if count else n
        early = None
        if "early" in mode:
            early = EarlyStop(float(tol), rule.min_samples, rule.group_size) if tol else rule
        specs.append(Spec(mode, 0 if mode == "mean" else k, early, int(other)))
    return specs


def run_spec(spec: Spec, method: Any, model: nn.Module, batch: dict, option_ids, resolved) -> Any:
    """One timed unit: the reference LoRA pass, or the predictive of ``spec`` on ``batch``."""
    if spec.mode == "lora":
        with torch.no_grad(), sampling(model, False):
            return torch.softmax(answer_logits(model, batch, option_ids), -1)
    return predict_batch(method, model, batch, option_ids, resolved, None, spec.early)


def resolve_all(specs: list[Spec], method: Any, model: nn.Module) -> dict[str, Any]:
    import warnings

    out = {}
    for spec in specs:
        if spec.mode == "lora":
            out[spec.name] = None
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[spec.name] = resolve_mode(method, model, spec.mode, spec.n)
        for w in caught:
            print(f"  note: {spec.name}: {w.message}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# cpu setting: a trained adapter on real data


def quick_run(out: Path, data_root: str | None, task: str) -> Path:
    """Train a small BLoB adapter (q/v of blocks 22-29 + lm_head, like the demo) into ``out``.

    A few CPU minutes cannot learn the posterior std a full run reaches (about 0.1, method doc
    section 8); a 24-step adapter would keep its initial std of ~0.002, its samples would all
    agree and every mode would score alike. So the std starts at that magnitude instead
    (``init_std`` 0.3: std in [0.045, 0.09]) and the comparison of modes means something.
    """
    from blob_lora.models import load_model_and_tokenizer
    from blob_lora.pipeline import train
    from blob_lora.training.config import TrainConfig

    print(f"no --run given: training a quick BLoB adapter into {out} ...", flush=True)
    base, tok = load_model_and_tokenizer("smollm2-135m")
    cfg = TrainConfig(
        model="smollm2-135m",
        task=task,
        method="blob",
        out=str(out),
        data_root=data_root,
        train_split="train[:96]",
        eval_split="validation[:100]",
        epochs=2,
        init_std=0.3,
        batch_size=8,
        lr=1e-3,
        max_length=192,
        eval_samples=10,
        target_modules=[DEMO_TARGETS],
        evaluate=False,
        eval_tasks=[],
    )
    train(cfg, overwrite=True, progress=False, base_model=base, tokenizer=tok)
    return out


def cpu_batches(loaded: Any, args: argparse.Namespace):
    from blob_lora.tasks import MCCollator, MCDataset, get_task, option_token_ids

    cfg = loaded.config
    task = get_task(args.task or cfg.data.task, data_root=args.data_root or cfg.data.data_root)
    split = args.eval_split or cfg.evaluation.eval_split or "validation[:100]"
    dataset = MCDataset(task, split, loaded.tokenizer, cfg.data.max_length)
    collator = MCCollator(loaded.tokenizer.pad_token_id, task.n_options)
    bs = args.batch_size
    batches = [
        collator([dataset[i] for i in range(s, min(s + bs, len(dataset)))])
        for s in range(0, len(dataset), bs)
    ]
    return task, split, batches, option_token_ids(loaded.tokenizer, task)


def quality(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from blob_lora.metrics import classification_metrics
    from blob_lora.prediction.reports import selective_metrics

    m = classification_metrics(probs, labels)
    m.update(selective_metrics(probs.max(-1).values, probs.argmax(-1) == labels))
    return m


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    from blob_lora.training.saved_run import load_run

    # the option first: the environment variable is only its default
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 2)
    torch.set_num_threads(threads)
    run_dir = Path(args.run) if args.run else None
    if run_dir is None:
        run_dir = quick_run(REPO / "bench" / "out" / "quick_blob_run", args.data_root, "openbookqa")
    loaded = load_run(run_dir)
    model, method = loaded.model.eval(), loaded.method
    task, split, batches, option_ids = cpu_batches(loaded, args)
    rule = EarlyStop(args.early_tol, args.early_min, args.early_group)
    specs = parse_specs(args.modes, args.n, rule)
    resolved = resolve_all(specs, method, model)
    n_examples = sum(int(b["labels"].numel()) for b in batches)
    print(
        f"{run_dir}: {task.name} {split}, {n_examples} examples in {len(batches)} batches, "
        f"{threads} threads; modes: {', '.join(s.name for s in specs)}",
        flush=True,
    )
    device = torch.device("cpu")
    for spec in specs:  # warm-up: one untimed batch per mode
        run_spec(spec, method, model, batches[0], option_ids, resolved[spec.name])
    times: dict[str, list[float]] = {s.name: [] for s in specs}
    outputs: dict[str, list[Any]] = {s.name: [] for s in specs}
    for bi, batch in enumerate(batches):
        for spec in specs:
            # fold and prefix draw the same noise; "other noise" rows shift the seed
            torch.manual_seed(args.seed * 100_003 + bi + 7_919 * spec.seed_offset)
            synchronize(device)
            t0 = time.perf_counter()
            out = run_spec(spec, method, model, batch, option_ids, resolved[spec.name])
            synchronize(device)
            times[spec.name].append(time.perf_counter() - t0)
            outputs[spec.name].append(out)
        done = ", ".join(f"{s.name} {times[s.name][-1]:.2f}s" for s in specs[:3])
        print(f"  batch {bi + 1}/{len(batches)}: {done}, ...", flush=True)
    labels = torch.cat([b["labels"] for b in batches])
    rows = []
    lora_total = sum(times[specs[0].name])
    for spec in specs:
        outs = outputs[spec.name]
        if spec.mode == "lora":
            probs = torch.cat(outs).double()
            n_used, epistemic, mode_used = 1.0, None, "lora"
        else:
            probs = torch.cat([o.probs for o in outs])
            n_used = float(torch.cat([o.n_used for o in outs]).double().mean())
            epi = [o.epistemic for o in outs]
            epistemic = float(torch.cat(epi).mean()) if all(e is not None for e in epi) else None
            mode_used = resolved[spec.name].mode
        total = sum(times[spec.name])
        q = quality(probs, labels)
        rows.append(
            {
                "name": spec.name,
                "mode": spec.mode,
                "mode_used": mode_used,
                "other": bool(spec.seed_offset),
                "eval_samples": spec.n,
                "early": None if spec.early is None else spec.early.__dict__,
                "mean_samples_used": n_used,
                "latency_s": statistics.median(times[spec.name]),
                "examples_per_s": n_examples / total,
                "total_s": total,
                "x_lora": total / lora_total,
                "times_s": times[spec.name],
                "accuracy": q["accuracy"],
                "ece": q["ece"],
                "nll": q["nll"],
                "brier": q["brier"],
                "aurc": q["aurc"],
                "mean_epistemic": epistemic,
            }
        )
    judge(rows, args.n)
    return {
        "setting": "cpu",
        "run": str(run_dir),
        "task": task.name,
        "split": split,
        "n_examples": n_examples,
        "batch_size": args.batch_size,
        "max_length": loaded.config.data.max_length,
        "bayesian_layers": _bayesian_summary(method, model),
        "rows": rows,
    }


def judge(rows: list[dict[str, Any]], n: int) -> None:
    """Deltas to the full N-sample predictive and whether each row meets the issue's targets."""
    ref = next(
        (r for r in rows if r["mode"] == "fold" and r["eval_samples"] == n and not r["other"]),
        None,
    )
    for r in rows:
        if ref is None or r["mode"] == "lora":
            r.update(d_ece=None, d_nll=None, meets_fast_target=None)
            continue
        r["d_ece"] = r["ece"] - ref["ece"]
        r["d_nll"] = r["nll"] - ref["nll"]
        r["meets_fast_target"] = bool(
            abs(r["d_ece"]) <= ECE_TOL and abs(r["d_nll"]) <= NLL_TOL and r["x_lora"] <= FAST_COST
        )
    if ref is not None:
        ref["meets_full_target"] = bool(ref["x_lora"] <= FULL_COST)


def _bayesian_summary(method: Any, model: nn.Module) -> dict[str, Any]:
    from blob_lora.prediction.fast import plan_prefix

    names = method.stochastic_modules(model) or []
    plan, why = plan_prefix(method, model)
    return {
        "n_random_layers": len(names),
        "prefix_blocks": plan.start if plan else 0,
        "n_blocks": plan.n_layers if plan else None,
        "no_prefix_reason": why or None,
    }


def cpu_table(report: dict[str, Any]) -> str:
    header = ["mode", "N used", "latency s", "ex/s", "x LoRA", "ACC", "ECE %", "NLL", "AURC",
              "dECE pt", "dNLL", "target"]  # fmt: skip
    body = []
    for r in report["rows"]:
        target = r.get("meets_fast_target")
        if "meets_full_target" in r:
            target = f"full<=10.1x: {'yes' if r['meets_full_target'] else 'no'}"
        elif r["other"]:
            target = "MC noise floor"
        elif target is not None:
            target = "yes" if target else "no"
        body.append(
            [
                r["name"],
                f"{r['mean_samples_used']:.2f}",
                f"{r['latency_s']:.3f}",
                f"{r['examples_per_s']:.2f}",
                f"{r['x_lora']:.2f}",
                f"{r['accuracy']:.3f}",
                f"{100 * r['ece']:.2f}",
                f"{r['nll']:.4f}",
                f"{r['aurc']:.4f}",
                "" if r["d_ece"] is None else f"{100 * r['d_ece']:+.2f}",
                "" if r["d_nll"] is None else f"{r['d_nll']:+.4f}",
                target,
            ]
        )
    return format_table(header, body)


# ---------------------------------------------------------------------------------------------
# gpu setting: latency on a 7B-shaped model


def build_7b_blob(device: torch.device, dtype: torch.dtype, tiny: bool, rank: int):
    """A random-init Llama (7B shape, or tiny) with BLoB on q/v/lm_head, all layers Bayesian."""
    from peft import LoraConfig

    from blob_lora import BlobConfig, get_blob_model

    torch.manual_seed(0)
    base = random_llama(TINY_SHAPE if tiny else LLAMA2_7B_SHAPE, device, dtype).eval()
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_blob_model(base, lora, BlobConfig())
    with torch.no_grad():  # a trained-looking adapter: B != 0, so weight noise reaches the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.eval(), base.config


def keep_last_blocks_bayesian(model: nn.Module, n_layers: int, k: int) -> None:
    """Drop the std of every BLoB layer below the last ``k`` blocks (the head stays Bayesian)."""
    import re

    from blob_lora import blob_layers

    for name, layer in blob_layers(model):
        m = re.search(r"\blayers\.(\d+)\.", name)
        if m and int(m.group(1)) < n_layers - k:
            layer.make_deterministic("default")


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    from blob_lora.methods import get_method

    device = torch.device(args.device or "cuda")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    model, config = build_7b_blob(device, dtype, args.tiny_shape, args.rank)
    method = get_method("blob")
    n_layers = config.num_hidden_layers
    b, t = args.gpu_batch, args.seq_len or (32 if args.tiny_shape else 300)
    g = torch.Generator().manual_seed(args.seed)
    batch = {
        "input_ids": torch.randint(10, config.vocab_size, (b, t), generator=g).to(device),
        "attention_mask": torch.ones(b, t, dtype=torch.long, device=device),
        "option_mask": torch.ones(b, 4, dtype=torch.bool, device=device),
        "labels": torch.zeros(b, dtype=torch.long, device=device),
    }
    option_ids = torch.tensor([319, 350, 315, 360]) % config.vocab_size
    rule = EarlyStop(args.early_tol, args.early_min, args.early_group)
    ks = sorted({min(k, n_layers) for k in (args.last_k or [n_layers])}, reverse=True)
    results = []
    for k in ks:
        keep_last_blocks_bayesian(model, n_layers, k)
        modes = args.modes if k < n_layers else [m for m in args.modes if "prefix" not in m]
        specs = parse_specs(modes, args.n, rule)
        resolved = resolve_all(specs, method, model)
        label = "all blocks" if k == n_layers else f"last {k} blocks"
        print(f"BLoB on {label} + head: {', '.join(s.name for s in specs)}", flush=True)
        results.append(
            {
                "bayesian": label,
                "last_k": k,
                "rows": time_gpu(specs, resolved, method, model, batch, option_ids, device, args),
            }
        )
    return {
        "setting": "gpu",
        "shape": "tiny" if args.tiny_shape else "llama2-7b",
        "dtype": args.dtype,
        "batch": b,
        "seq_len": t,
        "lora_rank": args.rank,
        "n_layers": n_layers,
        "results": results,
    }


def time_gpu(specs, resolved, method, model, batch, option_ids, device, args) -> list[dict]:
    for _ in range(args.warmup):
        for spec in specs:
            run_spec(spec, method, model, batch, option_ids, resolved[spec.name])
    times: dict[str, list[float]] = {s.name: [] for s in specs}
    used: dict[str, list[float]] = {s.name: [] for s in specs}
    for step in range(args.steps):
        for spec in specs:
            torch.manual_seed(args.seed * 100_003 + step)
            synchronize(device)
            t0 = time.perf_counter()
            out = run_spec(spec, method, model, batch, option_ids, resolved[spec.name])
            synchronize(device)
            times[spec.name].append(time.perf_counter() - t0)
            used[spec.name].append(
                1.0 if spec.mode == "lora" else float(out.n_used.double().mean())
            )
    ref = statistics.median(times[specs[0].name])
    rows = []
    for spec in specs:
        med = statistics.median(times[spec.name])
        row = {
            "name": spec.name,
            "mode_used": "lora" if spec.mode == "lora" else resolved[spec.name].mode,
            "eval_samples": spec.n,
            "mean_samples_used": statistics.mean(used[spec.name]),
            "latency_s": med,
            "examples_per_s": batch["input_ids"].shape[0] / med,
            "x_lora": med / ref,
            "times_s": times[spec.name],
        }
        if device.type == "cuda":
            mem = measure_peak_memory(
                lambda spec=spec: run_spec(
                    spec, method, model, batch, option_ids, resolved[spec.name]
                ),
                device,
            )
            row["peak_bytes"] = mem["peak_bytes"]
        rows.append(row)
        release_device_memory(device)
    return rows


def gpu_tables(report: dict[str, Any]) -> list[str]:
    tables = []
    for res in report["results"]:
        header = ["mode", "N used", "latency s", "ex/s", "x LoRA", "peak GiB"]
        body = [
            [
                r["name"],
                f"{r['mean_samples_used']:.2f}",
                f"{r['latency_s']:.4f}",
                f"{r['examples_per_s']:.2f}",
                f"{r['x_lora']:.2f}",
                f"{r['peak_bytes'] / 2**30:.2f}" if "peak_bytes" in r else "n/a",
            ]
            for r in res["rows"]
        ]
        tables.append(f"BLoB on {res['bayesian']} + head\n\n" + format_table(header, body))
    return tables


# ---------------------------------------------------------------------------------------------


CPU_MODES = [
    "mean",
    "fold:10",
    "fold:10~",
    "prefix:10",
    "early:10",
    "prefix-early:10",
    "prefix-early:10@0.03",
    "prefix:4",
]
GPU_MODES = ["mean", "fold:10", "early:10", "prefix:10", "prefix-early:10"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--run", help="cpu: trained BLoB run folder (default: train a quick one)")
    p.add_argument("--task", help="cpu: task to score (default: the run's)")
    p.add_argument("--eval-split", help="cpu: split (default: the run's eval split)")
    p.add_argument("--data-root", help="dataset folder (default: the run's, $BLOB_LORA_DATA)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="cpu: examples per batch")
    p.add_argument(
        "--modes",
        nargs="+",
        help="rows as MODE[:N][@TOL][~], e.g. fold:10 prefix-early:10@0.02; '~' = same mode "
        "with other noise (the Monte-Carlo noise floor); lora always runs",
    )
    p.add_argument(
        "--n", type=positive_int, default=10, help="N of the full predictive (default 10)"
    )
    p.add_argument("--early-tol", type=float, default=EarlyStop.tol)
    p.add_argument("--early-min", type=positive_int, default=EarlyStop.min_samples)
    p.add_argument("--early-group", type=positive_int, default=EarlyStop.group_size)
    p.add_argument("--device", help="gpu: device (default cuda; cpu for a dry run)")
    p.add_argument("--tiny-shape", action="store_true", help="gpu: tiny Llama, same code path")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--gpu-batch", type=positive_int, default=4)
    p.add_argument("--seq-len", type=positive_int, help="gpu: tokens per sequence (default 300)")
    p.add_argument(
        "--last-k",
        type=positive_int,
        nargs="+",
        help="gpu: Bayesian blocks at the top (default: all, 8, 4; tiny: all, 2, 1)",
    )
    p.add_argument("--warmup", type=natural_int, default=2, help="gpu: untimed rounds")
    p.add_argument(
        "--steps", type=positive_int, default=10, help="gpu: timed rounds (median reported)"
    )
    p.add_argument(
        "--threads", type=positive_int, help="torch threads (cpu default: $OMP_NUM_THREADS or 2)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default bench/out/predictive_<setting>.json)")
    args = p.parse_args(argv)
    if args.modes is None:
        args.modes = CPU_MODES if args.setting == "cpu" else GPU_MODES
    if args.data_root is None:
        shared = REPO.parent / "shared" / "data"
        args.data_root = os.environ.get("BLOB_LORA_DATA") or (
            str(shared) if shared.is_dir() else None
        )
    if args.setting == "gpu" and args.last_k is None:
        args.last_k = [4, 2, 1] if args.tiny_shape else [32, 8, 4]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cpu" if args.setting == "cpu" else (args.device or "cuda"))
    try:
        report = run_cpu(args) if args.setting == "cpu" else run_gpu(args)
    finally:
        gc.collect()
    report["machine"] = machine_info(device)
    report["targets"] = {
        "fast_mode": f"|dECE| <= {100 * ECE_TOL:g} pt and |dNLL| <= {NLL_TOL} vs full N={args.n} "
        f"at <= {FAST_COST:g}x one LoRA pass",
        "full": f"full N={args.n} at <= {FULL_COST:g}x one LoRA pass",
    }
    tables = [cpu_table(report)] if args.setting == "cpu" else gpu_tables(report)
    report["tables_markdown"] = tables
    suffix = "_tiny" if args.setting == "gpu" and args.tiny_shape else ""
    out = Path(args.out or REPO / "bench" / "out" / f"predictive_{args.setting}{suffix}.json")
    atomic_write_json(out, report)
    print(f"\n{report['machine']['device_name']} ({report['machine']['torch_threads']} threads)")
    for table in tables:
        print("\n" + table)
    print(f"\nwritten: {out}")
    return report


if __name__ == "__main__":
    main()
