"""The output head on each row's predicting positions only, and its vocabulary matrix on the
positions that are read only, against the whole kept suffix (cloze scoring;
``blob_lora.models.forward.cloze_logits``'s ``head_positions``).

Under cloze scoring the vocabulary logits are needed only where a scored token is predicted.
The model computes them on the suffix of the batch that holds every such position
(``logits_to_keep``, arm ``suffix``); in a batch that suffix also covers the other rows' longer
option spans, padding, and WinoGrande's unscored option contexts. Arm ``rows`` hands the head
only each row's own positions, padded to the row that needs most; arm ``flat`` (the default)
also runs the head's base layer (the vocabulary matrix, under the adapter) on the read
positions only. The scores are the same (tested in ``tests/models/test_head_rows.py``); this
script measures what each saves.

1. **Counted** (the tokenizer only; every task of ``--tasks``, the regime table's splits and
   max length 256): head positions per question, needed (distinct predicting positions: what
   ``flat``'s vocabulary matrix runs on), run on with the whole suffix and with the per-row
   gather (``rows``; the adapter's low-rank part in ``flat``), for evaluation (batches of
   ``--eval-batch`` of similar length, as ``evaluate_on_task``) and training (random batches of
   ``--train-batch`` in ``--chunks`` chunks, as ``--length-chunks``).
2. **Timed** (the real SmolLM2-135M; each task of ``--time-tasks``): the regime table's adapters
   (r=8 on q/v of the top 8 blocks + ``lm_head``), LoRA and BLoB (``--methods``; also
   ``bayesian-lora``, whose head names its own parts, ``flat_parts``), on the first
   ``--n-questions`` of the evaluation split in batches of similar length, and the same number
   of training questions in training batches. The frozen blocks' output is cached first (as
   evaluation and training do), then rounds run the three arms (their order rotated every
   round) and time the forward every loop of the project runs, ``answer_logits``:
   * evaluation, BLoB (or Bayesian-LoRA) N = ``--samples``: the folded batch in the method's
     sampling mode (what ``Method.predict_samples`` runs per batch), and LoRA's single forward;
   * training: each chunk's forward, cross-entropy and backward (the trainer's chunk loop; the
     KL of BLoB or Bayesian-LoRA, the same in every arm, left out).

   Before timing, the first evaluation batch is scored in every arm under one seed and the
   largest score difference from ``flat`` is recorded (``score_max_abs_diff_from_flat``): the
   arms compute the same scores on the real model, not only on the tests' tiny one.

    OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/python bench/head_rows.py
    .venv/bin/python bench/head_rows.py --setting tiny          # seconds, random tiny model

Writes ``bench/out/head_rows_<setting>.json`` and prints two Markdown tables; ``--out`` writes
elsewhere (``--out bench/results/head_rows_cpu.json`` for a run of record).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

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

from train_full_step import SETTINGS, load_base, shape_targets  # noqa: E402

from blob_lora.models.forward import (  # noqa: E402
    HEAD_POSITIONS,
    answer_logits,
    head_plan,
    predicting_positions,
    repeat_batch,
)
from blob_lora.models.prefix_cache import PrefixFeatureCache  # noqa: E402
from blob_lora.tasks import Scoring, get_task  # noqa: E402
from blob_lora.tasks.dataset import (  # noqa: E402
    length_sorted_batches,
    split_by_length,
    task_inputs,
)

#: the regime table's splits ("train"/"eval": the task's own) and length normalisation
#: (paper/regime_tables.yaml)
TABLE = {
    "winogrande_s": ("train", "eval", "none"),
    "winogrande_m": ("train", "eval", "none"),
    "arc_challenge": ("train", "eval", "char"),
    "arc_easy": ("train", "eval", "token"),
    "openbookqa": ("train", "eval", "char"),
    "boolq": ("validation[:2270]", "validation[2270:]", "char"),
}


def table_split(task: Any, split: str) -> str:
    """``split`` with the aliases ``train``/``eval`` replaced by the task's own split."""
    return {"train": task.train_split, "eval": task.eval_split}.get(split, split)


def head_positions(batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(needed, whole suffix, gathered): head positions of one cloze batch, from the plan
    ``cloze_logits`` itself makes (``predicting_positions``, ``head_plan``)."""
    rows, _, at, keep = predicting_positions(batch)
    b = batch["target_option"].shape[0]
    plan = head_plan(rows, at, b)
    return int(plan.counts.sum()), b * keep, b * plan.index.shape[1]


def count(args: argparse.Namespace, tokenizer: Any) -> list[dict[str, Any]]:
    rows = []
    for name in args.tasks:
        train_split, eval_split, norm = TABLE[name]
        task = get_task(name, args.data_root)
        for phase, alias in (("evaluate", eval_split), ("train", train_split)):
            split = table_split(task, alias)
            inp = task_inputs(task, split, tokenizer, args.max_length,
                              scoring=Scoring("cloze", norm))  # fmt: skip
            ds = inp.dataset
            if phase == "evaluate":
                batches = [inp.collator([ds[i] for i in b])
                           for b in length_sorted_batches(ds.lengths, args.eval_batch)]  # fmt: skip
            else:
                order = list(range(len(ds)))
                random.Random(args.seed).shuffle(order)
                batches = [chunk
                           for s in range(0, len(order), args.train_batch)
                           for chunk in split_by_length(
                               inp.collator([ds[i] for i in order[s : s + args.train_batch]]),
                               args.chunks)]  # fmt: skip
            totals = [sum(v) for v in zip(*(head_positions(b) for b in batches), strict=True)]
            n = len(ds)
            rows.append({"task": name, "phase": phase, "split": split, "questions": n,
                         "needed_per_q": totals[0] / n, "suffix_per_q": totals[1] / n,
                         "gathered_per_q": totals[2] / n,
                         "gathered_over_suffix": totals[2] / totals[1]})  # fmt: skip
            print(f"  counted {name} {phase}", flush=True)
    return rows


def adapted(base: nn.Module, method: str, targets: list[str]) -> nn.Module:
    """The regime table's adapter on a copy-free ``base`` (the weights' values do not matter
    for the cost; ``lora_B`` is drawn so that the adapters are not zero)."""
    from peft import LoraConfig, get_peft_model

    from blob_lora.tuners.bayesian_lora import get_bayesian_lora_model
    from blob_lora.tuners.blob import BlobConfig, get_blob_model

    pattern = targets[0] if len(targets) == 1 else targets  # one string: a regular expression
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=pattern, init_lora_weights=False)
    if method == "blob":
        return get_blob_model(base, lora, BlobConfig(init_std=0.05, prior_std=0.2))
    if method == "bayesian-lora":
        return get_bayesian_lora_model(base, lora)
    return get_peft_model(base, lora)


def batches_of(args: argparse.Namespace, tokenizer: Any, name: str, phase: str):
    train_split, eval_split, norm = TABLE[name]
    task = get_task(name, args.data_root)
    split = table_split(task, eval_split if phase == "evaluate" else train_split)
    inp = task_inputs(task, split, tokenizer, args.max_length, scoring=Scoring("cloze", norm))
    ds = inp.dataset
    n = min(args.n_questions, len(ds))
    if phase == "evaluate":
        groups = [
            [int(i) for i in b] for b in length_sorted_batches(ds.lengths[:n], args.eval_batch)
        ]
    else:
        order = list(range(n))
        random.Random(args.seed).shuffle(order)
        groups = [order[s : s + args.train_batch] for s in range(0, n, args.train_batch)]
    out = []
    for g in groups:
        batch = inp.collator([ds[i] for i in g])
        batch["index"] = torch.tensor(g)
        out.append(batch)
    return ds, out


def injector(model: nn.Module, ds: Any) -> Callable[[dict[str, torch.Tensor]], Any]:
    """``inject(batch)``: a context in which ``model`` starts from the cached output of its
    frozen blocks for ``batch`` (rows ``batch["index"]`` of ``ds``), as evaluation and
    training do; features are computed on first use and kept."""
    cache = PrefixFeatureCache.for_dataset(model, ds, None, keep=True)

    def inject(batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: v for k, v in batch.items() if k != "index"}
        if cache is None:
            return nullcontext(inputs)
        return _injected(cache, model, inputs, batch["index"])

    return inject


@contextmanager
def _injected(cache: PrefixFeatureCache, model: nn.Module, inputs: dict, index: torch.Tensor):
    with cache.injected(model, inputs, index):
        yield inputs


def time_task(args: argparse.Namespace, base: nn.Module, tokenizer: Any, name: str):
    from blob_lora.methods import get_method

    num_layers = int(base.config.num_hidden_layers)
    targets = shape_targets("demo", num_layers, args.top_blocks)
    rows = []
    for method in args.methods:
        model = adapted(copy.deepcopy(base), method, targets)
        sampler = get_method(method)
        for phase in ("evaluate", "train"):
            ds, batches = batches_of(args, tokenizer, name, phase)
            inject = injector(model, ds)
            n = args.samples if method != "lora" and phase == "evaluate" else 0

            @torch.no_grad()
            def score(batch: dict, where: str, model=model, sampler=sampler, n=n,
                      inject=inject) -> torch.Tensor:  # fmt: skip
                """One evaluation batch as the project scores it (BLoB: N samples folded)."""
                model.eval()
                with inject(batch) as b:
                    if n == 0:
                        return answer_logits(model, b, None, head_positions=where)
                    with sampler.sampling_mode(model, n):
                        return answer_logits(model, repeat_batch(b, n), None, head_positions=where)

            def evaluate(where: str, batches=batches, score=score) -> None:
                for batch in batches:
                    score(batch, where)

            def train(where: str, model=model, batches=batches, inject=inject) -> None:
                model.train()
                for batch in batches:
                    for chunk in split_by_length(batch, args.chunks):
                        with inject(chunk) as b:
                            logits = answer_logits(model, b, None, head_positions=where)
                            loss = nn.functional.cross_entropy(logits, b["labels"])
                        loss.backward()
                    model.zero_grad(set_to_none=True)

            def first_scores(where: str, batches=batches, score=score) -> torch.Tensor:
                torch.manual_seed(args.seed)  # BLoB: the same weight draws in every arm
                return score(batches[0], where)

            run = evaluate if phase == "evaluate" else train
            run("flat")  # warm-up: fills the prefix cache
            diffs = score_differences(first_scores) if phase == "evaluate" else None
            times: dict[str, list[float]] = {arm: [] for arm in HEAD_POSITIONS}
            for i in range(args.repeats):
                shift = i % len(HEAD_POSITIONS)
                for arm in HEAD_POSITIONS[shift:] + HEAD_POSITIONS[:shift]:
                    start = time.perf_counter()
                    run(arm)
                    times[arm].append(time.perf_counter() - start)
            seconds = {arm: summary(t) for arm, t in times.items()}
            med = {arm: v["median"] for arm, v in seconds.items()}
            label = f"{method} N={n}" if phase == "evaluate" else method
            rows.append({"task": name, "phase": phase, "method": label,
                         "questions": min(args.n_questions, len(ds)), "seconds": seconds,
                         "rows_over_suffix": med["rows"] / med["suffix"],
                         "flat_over_suffix": med["flat"] / med["suffix"],
                         "flat_over_rows": med["flat"] / med["rows"],
                         "score_max_abs_diff_from_flat": diffs})  # fmt: skip
            print(f"  {name} {phase} {label}: " + " / ".join(
                f"{arm} {med[arm]:.2f} s" for arm in HEAD_POSITIONS), flush=True)  # fmt: skip
        del model
    return rows


def score_differences(scores: Callable[[str], torch.Tensor]) -> dict[str, float]:
    """Largest |score difference| of the first evaluation batch between ``flat`` and each other
    arm (options a question lacks, -inf in every arm, left out). BLoB's evaluation noise (one
    weight sample per sequence, ``eval_noise="sequence"``) draws the same weights in every arm
    under one seed, so any difference is float rounding."""
    flat = scores("flat")
    out = {}
    for arm in ("suffix", "rows"):
        other = scores(arm)
        if not torch.equal(torch.isfinite(other), torch.isfinite(flat)):
            raise AssertionError(f"{arm} and flat disagree on which options exist")
        keep = torch.isfinite(flat)
        out[arm] = float((other - flat)[keep].abs().max())
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TABLE),
                   help="tasks counted (default all six; tiny: winogrande_s, whose sentences "
                   "fit the char tokenizer's budget)")  # fmt: skip
    p.add_argument("--time-tasks", nargs="*", default=None, choices=list(TABLE),
                   help="tasks timed (default winogrande_s arc_challenge; tiny: winogrande_s)")  # fmt: skip
    p.add_argument("--n-questions", type=positive_int, default=32)
    p.add_argument("--eval-batch", type=positive_int, default=16)
    p.add_argument("--train-batch", type=positive_int, default=8)
    p.add_argument(
        "--chunks", type=positive_int, default=4, help="--length-chunks of training batches"
    )
    p.add_argument("--samples", type=positive_int, default=10,
                   help="N at evaluation of the sampled methods")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=["lora", "blob"],
                   choices=["lora", "blob", "bayesian-lora"], help="adapters timed")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=4, help="timed rounds per arm")
    add_table_options(p)
    args = p.parse_args(argv)
    resolve_table_options(args, SETTINGS["tiny"].max_length)
    args.top_blocks = SETTINGS[args.setting].top_blocks
    tiny = args.setting == "tiny"
    if args.tasks is None:
        args.tasks = ["winogrande_s"] if tiny else list(TABLE)
    if args.time_tasks is None:
        args.time_tasks = ["winogrande_s"] if tiny else ["winogrande_s", "arc_challenge"]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_start = list(os.getloadavg())
    torch.manual_seed(0)
    base, tokenizer = load_base(SETTINGS[args.setting])
    counted = count(args, tokenizer)
    timed = [row for name in args.time_tasks for row in time_task(args, base, tokenizer, name)]
    out_path, report = write_report(
        args, "head_rows", load_start, {"counted": counted, "timed": timed}
    )
    print(format_table(
        ["task", "phase", "split", "needed/q", "suffix/q", "gathered/q", "gathered / suffix"],
        [[r["task"], r["phase"], r["split"], round(r["needed_per_q"], 1),
          round(r["suffix_per_q"], 1), round(r["gathered_per_q"], 1),
          round(r["gathered_over_suffix"], 2)] for r in counted]))  # fmt: skip
    if timed:
        print()
        print(format_table(
            ["task", "phase", "method", "questions", "suffix s", "rows s", "flat s",
             "rows / suffix", "flat / suffix", "flat / rows"],
            [[r["task"], r["phase"], r["method"], r["questions"],
              *(r["seconds"][arm]["median"] for arm in HEAD_POSITIONS),
              round(r["rows_over_suffix"], 3), round(r["flat_over_suffix"], 3),
              round(r["flat_over_rows"], 3)] for r in timed]))  # fmt: skip
    print(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
