"""Where a Laplace-LoRA run's predictive variance comes from: per layer, the part resting on
curvature the fit measured and the part resting on the prior alone.

Why: in the regime table (cloze scoring, LoRA on q/v of the top 8 blocks + ``lm_head``) the
Laplace rows lose accuracy against their own MAP (ARC-C -5.3 points, ARC-E -12.3, seed 1) with
a predictive close to uniform. Cloze scoring gives every vocabulary row of the head's
``lora_B`` a gradient, so its output-side Kronecker factor is kept as a rank-512 sketch
(``methods/laplace/kfac.py``) and every direction outside the sketch keeps the prior's
precision. This script measures, on questions of a split, how much of the logits' variance
each layer contributes and how much of that lies outside the kept subspace
(``LaplaceLoRA.logit_cov_by_layer``), and scores the linearised predictive with the variance
of chosen parts removed, so a reader can see which part flattens the answers. It chooses no
setting: run it on held-out questions for a diagnosis, and never pick a method's settings
from an evaluation split with it.

    OMP_NUM_THREADS=1 BLOB_LORA_DATA=../shared/data .venv/bin/python paper/laplace_variance.py \\
        paper/out/regime_tables/runs/arc_easy/laplace/seed1 --split eval --questions 96

Prints a Markdown table and writes ``laplace_variance.json`` into ``--out`` (default: the run
folder).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from blob_lora.methods.laplace.laplace_lora import sampled_softmax
from blob_lora.methods.laplace_method import _option_logits_fn, _posterior
from blob_lora.metrics.calibration import classification_metrics
from blob_lora.training.saved_run import load_run
from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import BlobLoraError

#: the predictive's variants: which parts of the covariance each keeps
VARIANTS = {
    "full (as the table)": ("body", "head kept", "head outside"),
    "head outside removed": ("body", "head kept"),
    "head removed (q/v only)": ("body",),
    "MAP (no variance)": (),
}


def group_of(layer: str, part: str) -> str:
    """``head kept`` / ``head outside`` for the output head's layers, ``body`` for the rest
    (both parts: the q/v adapters' factors are dense, nothing lies outside)."""
    return f"head {part}" if "lm_head" in layer else "body"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a Laplace run folder (its adapter/ holds the fit)")
    p.add_argument("--split", default="eval", help="the run's task split to score (default eval)")
    p.add_argument("--questions", type=int, default=96, help="the split's first N questions")
    p.add_argument("--samples", type=int, default=100, help="logit draws per question")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        loaded = load_run(args.run)
        cfg = loaded.config
        inp = loaded.split_inputs(args.split)
    except BlobLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    la = _posterior(loaded.model)
    la.logits_fn = _option_logits_fn(inp.option_ids)
    n = min(args.questions, len(inp.dataset))
    groups = ("body", "head kept", "head outside")
    means, covs, labels = [], {g: [] for g in groups}, []
    for start in range(0, n, args.batch_size):
        batch = inp.collator(
            [inp.dataset[i] for i in range(start, min(start + args.batch_size, n))]
        )
        labels.append(batch.pop("labels"))
        mean, by_layer = la.logit_cov_by_layer(batch)
        parts = {g: torch.zeros(mean.shape[0], mean.shape[1], mean.shape[1]) for g in groups}
        for layer, (kept, outside) in by_layer.items():
            parts[group_of(layer, "kept")] += kept.float()
            parts[group_of(layer, "outside")] += outside.float()
        for g in groups:
            covs[g].append(parts[g])
        means.append(mean.float())
        print(f"{min(start + args.batch_size, n)}/{n} questions", file=sys.stderr)
    mean_all, label_all = torch.cat(means), torch.cat(labels)
    cov_of = {g: torch.cat(covs[g]) for g in groups}
    variance = {g: torch.diagonal(c, dim1=-2, dim2=-1).sum().item() for g, c in cov_of.items()}
    n_options = int((~torch.isinf(mean_all)).sum())
    rows: dict[str, Any] = {}
    for name, keep in VARIANTS.items():
        gen = torch.Generator().manual_seed(args.seed)
        cov = sum((cov_of[g] for g in keep), torch.zeros_like(cov_of["body"]))
        probs = (
            sampled_softmax(mean_all, cov, args.samples, gen).mean(0)
            if keep and args.samples > 0
            else torch.softmax(mean_all, -1)
        )
        metrics = classification_metrics(probs, label_all)
        rows[name] = {k: metrics[k] for k in ("accuracy", "ece", "nll", "mean_confidence")}
    total = sum(variance.values())
    report = {
        "run": str(args.run),
        "task": cfg.data.task,
        "split": args.split,
        "questions": n,
        "samples": args.samples,
        "prior_precision": la.prior_precision,
        "mean_logit_variance_per_option": {g: v / n_options for g, v in variance.items()},
        "variance_share": {g: (v / total if total else math.nan) for g, v in variance.items()},
        "predictive": rows,
    }
    atomic_write_json((args.out or args.run) / "laplace_variance.json", report)
    print(
        f"{cfg.data.task}, {args.split}, first {n} questions, prior precision "
        f"{la.prior_precision:.3g}\n"
    )
    print("| part | mean logit variance per option | share |\n|---|---|---|")
    for g in groups:
        print(
            f"| {g} | {report['mean_logit_variance_per_option'][g]:.4f} | "
            f"{report['variance_share'][g]:.3f} |"
        )
    print("\n| predictive | ACC | ECE | NLL | conf |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['accuracy']:.3f} | {r['ece']:.3f} | {r['nll']:.3f} | "
            f"{r['mean_confidence']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
