"""Laplace-LoRA's fit under cloze scoring on the real model: what the sketched output factor
costs, against the LoRA training that produced the MAP.

Under cloze scoring an option's score is a log-softmax over the whole vocabulary, so every row
of the output head's ``lora_B`` gets a gradient and KFAC's ``G`` for it would be
vocabulary x vocabulary: 49,152² float64 numbers (19 GB) for SmolLM2, beyond this machine's
24 GiB once copied, and an eigendecomposition of hours. ``methods/laplace/kfac.py`` keeps such
a ``G`` as a rank-``g_rank`` sketch instead. This script fits the posterior on the first
``--n-questions`` training questions of ``--task`` with the regime table's adapters (r = 8 on
q/v of the top 8 blocks + ``lm_head``; a LoRA run's adapter with ``--adapter``, else fresh
random ones) and reports:

* the fit's time and peak memory, beside one LoRA training pass over the same questions
  (forward, cross-entropy, backward: what each epoch of the MAP run costs them), and the same
  fit from the frozen blocks' cached output (what ``fit_laplace`` does: the LoRA run of the
  split has written those features; its evidence is checked equal to the full fit's);
* the share of the head's ``G`` trace the sketch kept, its rank, and a bound on the curvature
  any direction it dropped lost, over the prior precision (``g_sketch_curvature_lost``: well
  below 1, a larger ``--g-rank`` would not move the predictive; on 64 questions it is, on the
  regime table's full training splits it is 151-1,020 and the dropped directions hold most of
  the predictive's variance, ``results/laplace_variance/``);
* the prior-precision search and the linearised predictive (100 samples, as the method runs)
  on the same questions, with the residual diagonal of the sketched ``G`` (the default) and
  without it (the fit before 2026-12-04): what keeping the diagonal costs.

    OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/python bench/laplace_head.py \\
        --adapter paper/out/regime_tables/runs/arc_challenge/lora/seed1/adapter
    .venv/bin/python bench/laplace_head.py --setting tiny        # seconds, random tiny model

Writes ``bench/out/laplace_head_<setting>.json`` and prints a Markdown table; ``--out`` writes
elsewhere (``--out bench/results/laplace_head_cpu.json`` for a run of record).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_table_options,
    checkout_relative,
    ensure_src_on_path,
    format_table,
    measure_peak_memory,
    natural_int,
    positive_int,
    resolve_table_options,
    write_report,
)

ensure_src_on_path()

from head_rows import TABLE, adapted, table_split  # noqa: E402
from train_full_step import SETTINGS, load_base, shape_targets  # noqa: E402

from blob_lora.methods.io import load_plain_adapter  # noqa: E402
from blob_lora.methods.laplace import LaplaceLoRA  # noqa: E402
from blob_lora.methods.laplace.kfac import DENSE_LIMIT, G_RANK  # noqa: E402
from blob_lora.methods.laplace_method import (  # noqa: E402
    _head_mask,
    _make_lora_trainable,
    _option_logits_fn,
)
from blob_lora.models.forward import answer_logits  # noqa: E402
from blob_lora.models.prefix_cache import PrefixFeatureCache  # noqa: E402
from blob_lora.tasks import Scoring, get_task  # noqa: E402
from blob_lora.tasks.dataset import IndexedCollator, IndexedDataset, task_inputs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--task", default="arc_challenge", choices=sorted(TABLE))
    p.add_argument("--n-questions", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=8, help="the table's batch size")
    p.add_argument(
        "--g-rank", type=positive_int, default=G_RANK, help="rank of the head's G sketch"
    )
    p.add_argument("--g-dense-limit", type=natural_int, default=DENSE_LIMIT,
                   help="widest G kept dense (the tiny model's vocabulary is under the default)")  # fmt: skip
    p.add_argument("--adapter", type=Path, default=None, help="a LoRA run's adapter folder")
    add_table_options(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    resolve_table_options(args, tiny_max_length=512)
    load_start = list(os.getloadavg())
    setting = SETTINGS[args.setting]
    base, tokenizer = load_base(setting)
    if args.adapter is not None:
        model = load_plain_adapter(base, args.adapter)
    else:
        n_layers = base.config.num_hidden_layers
        model = adapted(base, "lora", shape_targets("demo", n_layers, min(8, n_layers)))
    _make_lora_trainable(model)
    train_split, _, norm = TABLE[args.task]
    task = get_task(args.task, args.data_root)
    split = table_split(task, train_split)
    inp = task_inputs(task, split, tokenizer, args.max_length, scoring=Scoring("cloze", norm))
    n = min(args.n_questions, len(inp.dataset))
    indexed, collate = IndexedDataset(inp.dataset), IndexedCollator(inp.collator)
    with_index = [
        collate([indexed[i] for i in range(s, min(s + args.batch, n))])
        for s in range(0, n, args.batch)
    ]
    batches = [{k: v for k, v in b.items() if k != "index"} for b in with_index]
    vocab = model.get_output_embeddings().out_features

    def lora_pass() -> None:
        model.train()
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = answer_logits(model, inputs, inp.option_ids)
            torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    holder: dict[str, Any] = {}
    prefix = PrefixFeatureCache.for_dataset(model, inp.dataset, None)

    def fit(cached: bool = False) -> None:
        la = LaplaceLoRA(
            model,
            _option_logits_fn(inp.option_ids, prefix if cached else None),
            head_mask_fn=_head_mask,
            g_rank=args.g_rank,
            g_dense_limit=args.g_dense_limit,
        )
        la.fit(with_index if cached else batches)
        holder["cached" if cached else "la"] = la

    t = time.perf_counter()
    lora_memory = measure_peak_memory(lora_pass, torch.device("cpu"))
    lora_seconds = time.perf_counter() - t
    t = time.perf_counter()
    fit_memory = measure_peak_memory(fit, torch.device("cpu"))
    fit_seconds = time.perf_counter() - t
    cached_seconds = None
    if prefix is not None:  # the features are on disk from the LoRA run: computed untimed here
        for b, plain in zip(with_index, batches, strict=True):
            prefix.output_for(model, plain, b["index"])
        t = time.perf_counter()
        fit(cached=True)
        cached_seconds = time.perf_counter() - t
        same = (
            holder["cached"].log_marginal_likelihood(1.0),
            holder["la"].log_marginal_likelihood(1.0),
        )
        assert abs(same[0] - same[1]) <= 1e-5 * abs(same[1]), same
    la: LaplaceLoRA = holder["la"]

    def prior_and_predictive() -> tuple[float, float, float]:
        t = time.perf_counter()
        prior = la.optimize_prior_precision()
        prior_seconds = time.perf_counter() - t
        t = time.perf_counter()
        for batch in batches:  # the linearised predictive differentiates: no no_grad here
            probs = la.predictive({k: v for k, v in batch.items() if k != "labels"}, 100)
            assert torch.isfinite(probs).all()
        return prior, prior_seconds, time.perf_counter() - t

    prior, prior_seconds, predictive_seconds = prior_and_predictive()
    head = next((name for name in la.layers if "lm_head" in name and "lora_B" in name), None)
    without = None  # the same fit without the residual diagonal (what the fit did before it)
    if head is not None and la.layers[head].has_resid:
        with_resid = la.layers[head]
        la.layers[head] = replace(with_resid, g_resid=with_resid.g_resid[:0])
        without = prior_and_predictive()
        la.layers[head] = with_resid
        la.prior_precision = prior
    result = {
        "task": args.task,
        "split": split,
        "questions": n,
        "vocab": vocab,
        "dense_head_g_bytes": vocab * vocab * 8,
        "lora_pass_seconds": round(lora_seconds, 2),
        "lora_pass_peak_bytes": lora_memory.get("peak_bytes"),
        "fit_seconds": round(fit_seconds, 2),
        "fit_peak_bytes": fit_memory.get("peak_bytes"),
        "fit_over_lora_pass": round(fit_seconds / lora_seconds, 2),
        # the same fit from the frozen blocks' cached output (what fit_laplace does)
        "fit_cached_blocks_seconds": None if cached_seconds is None else round(cached_seconds, 2),
        "head_g_rank": None if head is None else int(la.layers[head].g_vals.numel()),
        "g_sketch_trace_kept": la.g_sketch_kept,
        "prior_precision": prior,
        # a bound on the curvature a direction the sketch dropped lost, over the prior
        # precision: well below 1, a larger --g-rank would not move the predictive (64
        # questions: yes; the table's full splits: 151-1,020, results/laplace_variance/)
        "g_sketch_curvature_lost": la.g_sketch_curvature_lost(),
        "g_residual": la.g_residual,
        "prior_search_seconds": round(prior_seconds, 2),
        "predictive_seconds_per_question": round(predictive_seconds / n, 3),
        # the head's G as its sketch alone (g_residual "none"): prior, search s, predictive s/q
        "without_residual": None
        if without is None
        else {
            "prior_precision": without[0],
            "prior_search_seconds": round(without[1], 2),
            "predictive_seconds_per_question": round(without[2] / n, 3),
        },
    }
    args.adapter = None if args.adapter is None else checkout_relative(args.adapter)
    path, _ = write_report(args, "laplace_head", load_start, result)
    gib = 1024**3
    rows = [[
        args.task, n, result["lora_pass_seconds"], result["fit_seconds"],
        result["fit_over_lora_pass"], result["fit_cached_blocks_seconds"] or "-",
        f"{(result['fit_peak_bytes'] or 0) / gib:.2f}",
        result["head_g_rank"],
        "-" if head is None or head not in la.g_sketch_kept else f"{la.g_sketch_kept[head]:.4f}",
        result["prior_search_seconds"],
        result["predictive_seconds_per_question"],
        "-" if without is None else f"{without[1]:.2f} / {without[2] / n:.3f}",
    ]]  # fmt: skip
    header = ["task", "questions", "LoRA pass s", "fit s", "fit / LoRA pass",
              "fit from cached blocks s", "fit peak GiB",
              "head G rank", "head G trace kept", "prior search s", "predictive s/question",
              "without residual diag: prior s / predictive s/q"]  # fmt: skip
    print(format_table(header, rows))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
