"""How faithful the Laplace fit's approximation of the head's output factor ``G`` is, measured
against the exact ``G`` on a subset of the training split small enough to hold it.

Why: under cloze scoring every vocabulary row of the head's ``lora_B`` gets a gradient, so the
fit keeps ``G`` as a rank-limited sketch (``methods/laplace/kfac.py``). On the regime table's
full training splits the sketch dropped curvature up to 1,020 times the prior precision and the
dropped directions held 95 % of the logits' variance (``results/laplace_variance/``). This
script decides between approximations by their distance from the exact posterior, never by an
evaluation metric:

1. fit the run's MAP on the first ``--fit-questions`` training questions with a sketch wide
   enough to be exact (it checks that nothing was dropped);
2. build the head's factor as that ``G``'s leading ``r`` eigenpairs alone (``g_residual="none"``:
   the rest gets the prior) and with the exact diagonal of the rest (``"diag"``), for each
   ``--ranks`` value; optionally also the streaming sketch the library builds
   (``--streaming-rank``), fitted again on the same questions;
3. for every variant, choose the prior precision by the evidence as the method does, and
   compare on the next ``--held-out`` training questions (not in the fit, not an evaluation
   split): the head's logit variance, and the probit predictive's distance from the exact one
   (mean total variation), at the variant's own prior precision and at the exact fit's.

    OMP_NUM_THREADS=1 BLOB_LORA_DATA=../shared/data .venv/bin/python \\
        paper/laplace_head_fidelity.py paper/out/regime_tables/runs/arc_easy/laplace/seed1 \\
        --fit-questions 256 --held-out 96 --ranks 16 32 64 128 --streaming-rank 32

Prints Markdown tables and writes ``laplace_head_fidelity.json`` into ``--out`` (default: the
run folder). Only the MAP adapter of the run is used; its saved posterior is not read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blob_lora.methods.laplace import LaplaceLoRA
from blob_lora.methods.laplace.laplace_lora import probit_softmax
from blob_lora.methods.laplace.posterior import KronLayer
from blob_lora.methods.laplace_method import _head_mask, _make_lora_trainable, _option_logits_fn
from blob_lora.metrics.calibration import classification_metrics
from blob_lora.training.saved_run import load_run
from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import BlobLoraError


def top_eigenpairs(exact: KronLayer, rank: int, residual: bool) -> KronLayer:
    """The exact layer with ``G`` cut to its leading ``rank`` eigenpairs, plus (``residual``)
    the exact diagonal of the eigenpairs cut: what an ideal sketch of that rank would keep."""
    vals, vecs = exact.g_vals, exact.g_vecs
    layer = KronLayer(
        exact.in_dim,
        exact.out_dim,
        exact.a_vals,
        exact.a_vecs,
        vals[:rank].contiguous(),
        vecs[:, :rank].contiguous(),
        exact.g_support,
    )
    if residual:
        layer.g_resid = (vecs[:, rank:].pow(2) * vals[rank:]).sum(1).contiguous()
    return layer


class RecordingLayer(KronLayer):
    """The head's layer during the held-out passes: keeps each batch's ``J Q_A`` (options
    stacked, ``(B, C, out, k_A)``) so that every variant's covariance comes from one forward
    and C backward passes, and contributes nothing itself."""

    recorded: list[Tensor]

    def project(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor | None]:
        j = torch.einsum("bto,bti->boi", g.to(self.a_vecs.dtype), a.to(self.a_vecs.dtype))
        return j @ self.a_vecs.to(j.device), None

    def logit_cov_parts(self, parts, scale, prior_precision):
        jq = torch.stack([p[0] for p in parts], dim=1)
        self.recorded.append(jq.cpu())
        b, c = jq.shape[:2]
        return jq.new_zeros(b, c, c), None


def head_cov(layer: KronLayer, jq: Tensor, scale: float, delta: float) -> Tensor:
    """A variant's head covariance ``(B, C, C)`` from the recorded ``J Q_A`` (``A`` complete,
    so ``J Q_A`` has ``J``'s Gram matrix and stands in for ``J`` in the outside part)."""
    options = range(jq.shape[1])
    if layer.has_resid:
        parts = [(jq[:, c], None) for c in options]
    else:
        g_vecs = layer.g_vecs
        parts = [(torch.einsum("og,boa->bga", g_vecs, jq[:, c]), jq[:, c]) for c in options]
    kept, outside = layer.logit_cov_parts(parts, scale, delta)
    return kept if outside is None else kept + outside


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a Laplace run folder (its adapter/ holds the MAP)")
    p.add_argument("--fit-questions", type=int, default=256)
    p.add_argument("--held-out", type=int, default=96)
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--streaming-rank", type=int, default=None)
    p.add_argument("--exact-rank", type=int, default=8192, help="the exact fit's sketch rank")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        loaded = load_run(args.run)
        cfg = loaded.config
        inp = loaded.split_inputs("train")
    except BlobLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = loaded.model
    _make_lora_trainable(model)
    n_fit = min(args.fit_questions, len(inp.dataset))
    n_end = min(n_fit + args.held_out, len(inp.dataset))

    def batches(lo: int, hi: int):
        for start in range(lo, hi, args.batch_size):
            yield inp.collator(
                [inp.dataset[i] for i in range(start, min(start + args.batch_size, hi))]
            )

    def fit(g_rank: int) -> LaplaceLoRA:
        la = LaplaceLoRA(
            model,
            _option_logits_fn(inp.option_ids),
            head_mask_fn=_head_mask,
            g_rank=g_rank,
            g_residual="none",
        )
        tic = time.perf_counter()
        la.fit(batches(0, n_fit))
        print(f"fit (G sketch rank {g_rank}): {time.perf_counter() - tic:.0f} s", file=sys.stderr)
        return la

    la = fit(args.exact_rank)
    if len(la.g_sketch_norm_dropped) != 1:
        print("error: expected exactly one sketched layer (the head)", file=sys.stderr)
        return 2
    ((head, dropped),) = la.g_sketch_norm_dropped.items()
    if dropped > 0:
        print(
            f"error: the rank-{args.exact_rank} sketch dropped curvature on {n_fit} questions; "
            "raise --exact-rank or lower --fit-questions",
            file=sys.stderr,
        )
        return 2
    exact = la.layers[head]
    trace = float(exact.g_vals.sum())
    variants: dict[str, KronLayer] = {"exact": exact}
    for r in args.ranks:
        variants[f"top-{r}"] = top_eigenpairs(exact, r, residual=False)
        variants[f"top-{r} + diag"] = top_eigenpairs(exact, r, residual=True)
    if args.streaming_rank:  # the library's own sketch, fitted again; with and without D
        streamed = LaplaceLoRA(
            model,
            _option_logits_fn(inp.option_ids),
            head_mask_fn=_head_mask,
            g_rank=args.streaming_rank,
            g_residual="diag",
        )
        tic = time.perf_counter()
        streamed.fit(batches(0, n_fit))
        print(f"streamed fit: {time.perf_counter() - tic:.0f} s", file=sys.stderr)
        s_diag = streamed.layers[head]
        s_none = top_eigenpairs(s_diag, s_diag.g_vals.numel(), residual=False)
        variants[f"streamed-{args.streaming_rank}"] = s_none
        variants[f"streamed-{args.streaming_rank} + diag"] = s_diag
    body = {n: lay for n, lay in la.layers.items() if n != head}

    # one forward and C backward passes per held-out batch: body covariance and head J Q_A
    recorder = RecordingLayer(
        exact.in_dim, exact.out_dim, exact.a_vals, exact.a_vecs, exact.g_vals, exact.g_vecs,
        exact.g_support,
    )  # fmt: skip
    recorder.recorded = []
    la.layers = {**body, head: recorder}
    means, body_covs, labels = [], [], []
    for batch in batches(n_fit, n_end):
        labels.append(batch.pop("labels"))
        mean, by_layer = la.logit_cov_by_layer(batch)
        means.append(mean.double())
        body_covs.append(sum((k + o for n, (k, o) in by_layer.items() if n != head)).double())
    label_all = torch.cat(labels)
    mean_all = torch.cat(means)
    scale = la._scale

    chosen: dict[str, float] = {}
    for name, layer in variants.items():
        la.layers = {**body, head: layer}
        chosen[name] = la.optimize_prior_precision()
    report: dict[str, Any] = {
        "run": str(args.run),  # as given on the command line (give it relative to the checkout)
        "task": cfg.data.task,
        "fit_questions": n_fit,
        "held_out_questions": n_end - n_fit,
        "head": head,
        "g_rank_exact": int(exact.g_vals.numel()),
        "variants": {},
    }
    delta_exact = chosen["exact"]
    reference: dict[float, Tensor] = {}
    for name, layer in variants.items():
        row: dict[str, Any] = {
            "g_eigenpairs": int(layer.g_vals.numel()),
            "trace_kept": float(layer.g_vals.sum()) / trace if trace else 1.0,
            "residual_diagonal": layer.has_resid,
            "prior_precision": chosen[name],
        }
        for label, delta in (("own", chosen[name]), ("exact's", delta_exact)):
            heads = [head_cov(layer, jq, scale, delta) for jq in recorder.recorded]
            cov = torch.cat([b + h for b, h in zip(body_covs, heads, strict=True)])
            head_var = torch.cat([torch.diagonal(h, dim1=1, dim2=2) for h in heads])
            real = ~torch.isneginf(mean_all)
            probs = probit_softmax(mean_all, cov)
            if name == "exact":
                reference[delta] = probs
            ref = reference.get(delta)
            if ref is None:  # the exact posterior at this δ, for the distance
                ex_heads = [head_cov(exact, jq, scale, delta) for jq in recorder.recorded]
                ref = reference[delta] = probit_softmax(
                    mean_all, torch.cat([b + h for b, h in zip(body_covs, ex_heads, strict=True)])
                )
            metrics = classification_metrics(probs.float(), label_all)
            row[f"at {label} prior precision"] = {
                "head_logit_variance": float(head_var[real].mean()),
                "tv_from_exact": float(0.5 * (probs - ref).abs().sum(-1).mean()),
                **{k: metrics[k] for k in ("accuracy", "ece", "nll", "mean_confidence")},
            }
        report["variants"][name] = row
        print(f"{name}: done", file=sys.stderr)
    atomic_write_json((args.out or args.run) / "laplace_head_fidelity.json", report)
    print(
        f"{cfg.data.task}: exact G from {n_fit} training questions "
        f"({report['g_rank_exact']} eigenpairs); {n_end - n_fit} held-out training questions\n"
    )
    for label in ("own", "exact's"):
        print(
            f"\nat the {label} prior precision\n\n| variant | G pairs | trace kept | δ | head var | "
            "TV from exact | ACC | ECE | NLL | conf |\n|---|---|---|---|---|---|---|---|---|---|"
        )
        for name, row in report["variants"].items():
            m = row[f"at {label} prior precision"]
            print(
                f"| {name} | {row['g_eigenpairs']} | {row['trace_kept']:.3f} | "
                f"{row['prior_precision']:.3g} | {m['head_logit_variance']:.4g} | "
                f"{m['tv_from_exact']:.4f} | {m['accuracy']:.3f} | {m['ece']:.3f} | "
                f"{m['nll']:.3f} | {m['mean_confidence']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
