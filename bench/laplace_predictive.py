"""Laplace-LoRA's linearised predictive under cloze scoring: what one question costs, against a
LoRA evaluation forward in the same run, and what forming each option's Jacobian first saves.

The predictive needs, per question, the C option Jacobians of every LoRA factor projected onto
the posterior's eigenbases (``methods/laplace/posterior.py``). ``KronLayer.project`` forms
``J = Σ_t g_t a_tᵀ`` (``out × in``) and projects it; the earlier route projected the output
gradients ``g`` and inputs ``a`` position by position, and materialised the part of ``J``
outside the kept subspace. Both routes are timed here on the same fitted posterior and the same
questions (the earlier one as :class:`PositionwiseLayer`, kept only for this comparison), and
their covariances checked equal.

The posterior is fitted on the first ``--n-fit`` training questions of ``--task`` (the regime
table's adapters: r = 8 on q/v of the top 8 blocks + ``lm_head``, a LoRA run's adapter with
``--adapter``, else random ones), the predictive timed on the next ``--n-questions``, every
forward starting at the first adapted block from the frozen blocks' cached output, as in
evaluation (``prefix_cache``); those features are computed untimed first.

    OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/python bench/laplace_predictive.py
    .venv/bin/python bench/laplace_predictive.py --setting tiny        # seconds, random tiny model

Writes ``bench/out/laplace_predictive_<setting>.json`` and prints a Markdown table; ``--out``
writes elsewhere (``--out bench/results/laplace_predictive_cpu.json`` for a run of record).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_table_options,
    checkout_relative,
    ensure_src_on_path,
    format_table,
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
from blob_lora.methods.laplace.posterior import KronLayer  # noqa: E402
from blob_lora.methods.laplace_method import (  # noqa: E402
    _head_mask,
    _make_lora_trainable,
    _option_logits_fn,
)
from blob_lora.models.forward import answer_logits  # noqa: E402
from blob_lora.models.prefix_cache import PrefixFeatureCache  # noqa: E402
from blob_lora.tasks import Scoring, get_task  # noqa: E402
from blob_lora.tasks.dataset import IndexedCollator, IndexedDataset, task_inputs  # noqa: E402


class PositionwiseLayer(KronLayer):
    """The earlier projection, for comparison only: ``g`` and ``a`` projected per position,
    the part of ``J`` outside the kept subspace materialised row by row."""

    def project(self, a: Tensor, g: Tensor) -> tuple[Tensor, Any]:
        dt = self.a_vecs.dtype
        a, g = a.to(dt), g.to(dt)
        dev = a.device
        support = self.g_support.to(dev)
        a_vecs, g_vecs = self.a_vecs.to(dev), self.g_vecs.to(dev)
        j_proj = torch.einsum("btg,bta->bga", g[..., support] @ g_vecs, a @ a_vecs)
        in_support = torch.zeros(self.out_dim, dtype=torch.bool, device=dev)
        in_support[support] = True
        used = (g != 0).flatten(0, -2).any(0)
        complete = self.a_vals.numel() == self.in_dim and self.g_vals.numel() == support.numel()
        if complete and not bool((used & ~in_support).any()):
            return j_proj, None
        rows = torch.nonzero(used | in_support).flatten()
        j_rows = torch.einsum("btu,bti->bui", g[..., rows], a)
        g_vecs_rows = torch.zeros(rows.numel(), g_vecs.shape[1], dtype=dt, device=dev)
        g_vecs_rows[torch.searchsorted(rows, support)] = g_vecs
        back = torch.einsum("ug,bga,ia->bui", g_vecs_rows, j_proj, a_vecs)
        return j_proj, (rows, j_rows - back)

    def logit_cov_parts(
        self, parts: list, scale: float, prior_precision: float
    ) -> tuple[Tensor, Tensor | None]:
        j_proj = torch.stack([p[0] for p in parts], dim=1)
        var = 1.0 / (self.curvature_eigvals(scale) + prior_precision)
        cov = torch.einsum("bcga,bdga,ga->bcd", j_proj, j_proj, var)
        present = [p[1] for p in parts if p[1] is not None]
        if not present:
            return cov, None
        rows = torch.unique(torch.cat([r[0] for r in present]))
        full = j_proj.new_zeros(j_proj.shape[0], len(parts), rows.numel(), self.in_dim)
        for c, p in enumerate(parts):
            if p[1] is not None:
                full[:, c, torch.searchsorted(rows, p[1][0])] = p[1][1]
        return cov, torch.einsum("bcui,bdui->bcd", full, full) / prior_precision


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--task", default="arc_challenge", choices=sorted(TABLE))
    p.add_argument("--n-fit", type=positive_int, default=16, help="training questions the fit sees")
    p.add_argument(
        "--n-questions", type=positive_int, default=32, help="questions timed (the next ones)"
    )
    p.add_argument(
        "--batch", type=positive_int, default=16, help="the table's evaluation batch size"
    )
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
    base, tokenizer = load_base(SETTINGS[args.setting])
    if args.adapter is not None:
        model = load_plain_adapter(base, args.adapter)
    else:
        torch.manual_seed(args.seed)
        n_layers = base.config.num_hidden_layers
        model = adapted(base, "lora", shape_targets("demo", n_layers, min(8, n_layers)))
        for name, param in model.named_parameters():  # a trained-looking B, not LoRA's zeros
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.01)
    _make_lora_trainable(model)
    train_split, _, norm = TABLE[args.task]
    task = get_task(args.task, args.data_root)
    split = table_split(task, train_split)
    inp = task_inputs(task, split, tokenizer, args.max_length, scoring=Scoring("cloze", norm))
    n_fit = min(args.n_fit, len(inp.dataset) - 1)
    n = min(args.n_questions, len(inp.dataset) - n_fit)
    indexed, collate = IndexedDataset(inp.dataset), IndexedCollator(inp.collator)

    def batches(lo: int, hi: int, size: int) -> list[dict[str, Tensor]]:
        return [collate([indexed[i] for i in range(s, min(s + size, hi))]) for s in range(lo, hi, size)]  # fmt: skip

    prefix = PrefixFeatureCache.for_dataset(model, inp.dataset, None)
    logits_fn = _option_logits_fn(inp.option_ids, prefix)
    # the two projection routes compared here predate the residual diagonal of a sketched G
    # (its own cost is in bench/laplace_head.py): the head's G is the sketch alone
    la = LaplaceLoRA(
        model, logits_fn, head_mask_fn=_head_mask, g_rank=args.g_rank,
        g_dense_limit=args.g_dense_limit, g_residual="none",
    )  # fmt: skip
    t = time.perf_counter()
    la.fit(batches(0, n_fit, 8))
    fit_seconds = time.perf_counter() - t
    la.optimize_prior_precision()
    timed = [{k: v for k, v in b.items() if k != "labels"} for b in batches(n_fit, n_fit + n, args.batch)]  # fmt: skip
    model.eval()
    with torch.no_grad():
        for b in timed:  # the frozen blocks' features, as the other runs of the split left them
            logits_fn(model, b)
    current = dict(la.layers)
    earlier = {
        name: PositionwiseLayer(
            **{f.name: getattr(layer, f.name) for f in fields(KronLayer) if f.init}
        )
        for name, layer in current.items()
    }

    def lora_pass() -> None:  # as evaluation scores a LoRA run: the head on read positions only
        with torch.no_grad():
            for b in timed:
                inputs = {k: v for k, v in b.items() if k != "index"}
                with prefix.injected(model, inputs, b["index"]) if prefix else nullcontext():
                    answer_logits(model, inputs, inp.option_ids)

    def predictive(layers: dict[str, KronLayer]) -> list[Tensor]:
        la.layers = layers
        return [la.predictive_logit_moments(b)[1] for b in timed]

    seconds: dict[str, float] = {}
    covs: dict[str, list[Tensor]] = {}
    for label, run in (("lora", lora_pass), ("jacobian_first", lambda: predictive(current)),
                       ("positionwise", lambda: predictive(earlier))):  # fmt: skip
        t = time.perf_counter()
        out = run()
        seconds[label] = time.perf_counter() - t
        if out is not None:
            covs[label] = out
    la.layers = current
    worst = max(
        float((new - old).abs().max() / old.abs().max().clamp_min(1e-300))
        for new, old in zip(covs["jacobian_first"], covs["positionwise"], strict=True)
    )
    assert worst < 1e-8, f"the two projections disagree: relative difference {worst:.2e}"
    per_q = {k: round(v / n, 4) for k, v in seconds.items()}
    result = {
        "task": args.task,
        "split": split,
        "fit_questions": n_fit,
        "questions": n,
        "fit_seconds": round(fit_seconds, 2),
        "seconds_per_question": per_q,
        "jacobian_first_over_positionwise": round(
            seconds["jacobian_first"] / seconds["positionwise"], 3
        ),  # fmt: skip
        "jacobian_first_over_lora": round(seconds["jacobian_first"] / seconds["lora"], 2),
        "covariance_max_relative_difference": worst,
    }
    args.adapter = None if args.adapter is None else checkout_relative(args.adapter)
    path, _ = write_report(args, "laplace_predictive", load_start, result)
    rows = [[args.task, n, per_q["lora"], per_q["positionwise"], per_q["jacobian_first"],
             result["jacobian_first_over_positionwise"], result["jacobian_first_over_lora"]]]  # fmt: skip
    header = ["task", "questions", "LoRA forward s/q", "Laplace, position-wise s/q",
              "Laplace, J first s/q", "J first / position-wise", "J first / LoRA"]  # fmt: skip
    print(format_table(header, rows))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
