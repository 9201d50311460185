"""What cloze scoring costs against letter scoring: per training step and per evaluation pass.

``letter`` scoring reads one next-token logit (the answer letter) after a prompt that lists the
options; ``cloze`` scoring packs the question and all its options into one sequence and sums each
option's token log-probabilities (``blob_lora.tasks.cloze``). On the same fixed batch of real
questions per task (the first ``--batch-size`` of BoolQ ``validation``, of the others' ``train``)
this script times, interleaved in one process so that drift of the machine hits every variant
alike:

* one **training step** (``answer_logits``, cross-entropy over the (B, C) class logits, for BLoB
  plus ``1e-3 * kl_divergence``, backward, AdamW step, ``zero_grad``) of LoRA and of BLoB
  (r=8, alpha=16 on ``q_proj``, ``v_proj``, ``lm_head``) under each scoring;
* one **evaluation pass** (no grad) per question: LoRA one pass, BLoB N=10 folded into the batch
  (the method's ``predict_samples``), under each scoring;

and counts, without timing, the tokens per question: letter prompt, packed cloze sequence, and
the unpacked cloze baseline that packing avoids (every option as its own ``prompt + option``).
The issue's target: cloze costs at most (number of options) x letter per question, and less
where the options share a prefix.

    OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/python bench/scoring.py
    .venv/bin/python bench/scoring.py --setting tiny --tasks openbookqa   # smoke test, seconds

Writes ``bench/out/scoring.json`` (``--out``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    ensure_src_on_path,
    format_table,
    machine_info,
    natural_int,
    positive_int,
    summary,
    timed,
)

ensure_src_on_path()

from blob_lora.methods import get_method  # noqa: E402
from blob_lora.models.forward import answer_logits  # noqa: E402
from blob_lora.tasks import Scoring, get_task, task_inputs  # noqa: E402
from blob_lora.tuners.blob import BlobConfig, get_blob_model, kl_divergence  # noqa: E402
from blob_lora.utils.atomic import atomic_write_json  # noqa: E402

TASKS = ("arc_easy", "openbookqa", "winogrande_s", "boolq")
SCORINGS = ("letter", "cloze")
METHODS = ("lora", "blob")
TARGETS = ["q_proj", "v_proj", "lm_head"]
ADAMW = {"lr": 1e-4, "eps": 1e-6, "weight_decay": 0.0}  # as bench/train_step.py
KL_WEIGHT = 1e-3
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Setting:
    model: str  # "smollm2-135m" (embedded) or "tiny" (random 2-block Llama, char tokenizer)
    max_length: int
    warmup: int
    steps: int


SETTINGS = {
    "cpu": Setting("smollm2-135m", 300, 2, 5),
    # the char tokenizer spends a token per character: a longer budget keeps the prompts whole
    "tiny": Setting("tiny", 1024, 1, 3),
}


# ---------------------------------------------------------------------------------------------
# model, adapters, batches


def load_base(setting: Setting) -> tuple[nn.Module, Any]:
    if setting.model == "tiny":
        sys.path.insert(0, str(REPO))
        from tests.factories import tiny_base, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        base = tiny_base(tokenizer)
        base.config.max_position_embeddings = max(1024, setting.max_length)
    else:
        from blob_lora.models import load_model_and_tokenizer

        base, tokenizer = load_model_and_tokenizer(setting.model, dtype=torch.float32)
    base.config.use_cache = False
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tokenizer


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )


def build_models(base: nn.Module) -> dict[str, nn.Module]:
    """LoRA and BLoB on two copies of the base, both alive, so their steps can interleave."""
    from peft import get_peft_model

    other = copy.deepcopy(base)
    torch.manual_seed(0)
    lora = get_peft_model(base, lora_config())
    torch.manual_seed(0)
    blob = get_blob_model(other, lora_config(), BlobConfig())
    return {"lora": lora, "blob": blob}


def split_for(task_name: str, n: int) -> str:
    return f"validation[:{n}]" if task_name == "boolq" else f"train[:{n}]"


def task_batches(task_name: str, tokenizer, args) -> dict[str, dict[str, Any]]:
    """Per scoring: the collated batch, its items and the answer-token ids (letter only)."""
    task = get_task(task_name, data_root=args.data_root)
    split = split_for(task_name, args.batch_size)
    out = {}
    for mode in SCORINGS:
        inputs = task_inputs(task, split, tokenizer, args.max_length, scoring=Scoring(mode))
        items = [inputs.dataset[i] for i in range(len(inputs.dataset))]
        if len(items) != args.batch_size:
            raise SystemExit(f"{task_name} {split}: {len(items)} examples, not {args.batch_size}")
        out[mode] = {
            "batch": inputs.collator(items),
            "items": items,
            "option_ids": inputs.option_ids,
            "n_truncated": inputs.dataset.n_truncated,
        }
    return out


def token_counts(letter_items: Sequence[dict], cloze_items: Sequence[dict]) -> dict[str, Any]:
    """Tokens per question: letter prompt, packed cloze sequence and the unpacked baseline.

    Unpacked = every option as its own sequence ``prefix + shared prompt + option``, i.e. the sum
    over options of (shared + option tokens); packing runs the shared part once, so it saves
    (options - 1) x shared tokens per question.
    """
    letter, packed, unpacked, shared, options = [], [], [], [], []
    for lit, cit in zip(letter_items, cloze_items, strict=True):
        branch = cit["branch"]
        n_opt = int(cit["n_options"])
        n_shared = sum(1 for b in branch if b == 0)
        per_option = [sum(1 for b in branch if b == k + 1) for k in range(n_opt)]
        letter.append(len(lit["input_ids"]))
        packed.append(len(branch))
        unpacked.append(sum(n_shared + n for n in per_option))
        shared.append(n_shared)
        options.append(n_opt)
    mean = statistics.fmean
    return {
        "options_mean": mean(options),
        "letter_tokens": mean(letter),
        "cloze_packed_tokens": mean(packed),
        "cloze_unpacked_tokens": mean(unpacked),
        "cloze_shared_tokens": mean(shared),
        "packing_saves_tokens": mean(unpacked) - mean(packed),
        "packed_over_unpacked": mean(packed) / mean(unpacked),
    }


# ---------------------------------------------------------------------------------------------
# timing


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, steps: int) -> dict[str, list]:
    """Times of every variant, one call each per repetition; the order reverses every other
    repetition, so neither warm caches nor a drifting machine favour one variant."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(warmup + steps):
        for k in names if rep % 2 == 0 else names[::-1]:
            t = timed(fns[k], CPU)
            if rep >= warmup:
                times[k].append(t)
    return times


def train_step_fn(method: str, model: nn.Module, data: dict[str, Any], opt) -> Callable[[], None]:
    batch, option_ids = data["batch"], data["option_ids"]

    def step() -> None:
        model.train()
        logits = answer_logits(model, batch, option_ids)
        loss = F.cross_entropy(logits, batch["labels"])
        if method == "blob":
            loss = loss + KL_WEIGHT * kl_divergence(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def eval_fn(method: str, model: nn.Module, data: dict[str, Any], n: int) -> Callable[[], None]:
    impl = get_method(method)
    batch, option_ids = data["batch"], data["option_ids"]

    def evaluate() -> None:
        probs = impl.predict_samples(model, batch, option_ids, n)
        if not bool(torch.isfinite(probs).all()):
            raise RuntimeError(f"{method}: non-finite predictive")

    return evaluate


def _ratio(times: dict[str, dict], method: str) -> float:
    return times[f"{method}/cloze"]["median"] / times[f"{method}/letter"]["median"]


def measure_task(task_name: str, models, opts, tokenizer, args) -> dict[str, Any]:
    data = task_batches(task_name, tokenizer, args)
    counts = token_counts(data["letter"]["items"], data["cloze"]["items"])
    b = args.batch_size
    train = interleaved(
        {
            f"{m}/{s}": train_step_fn(m, models[m], data[s], opts[m])
            for m in METHODS
            for s in SCORINGS
        },
        args.warmup,
        args.steps,
    )
    samples = {"lora": 0, "blob": args.samples}
    evals = interleaved(
        {f"{m}/{s}": eval_fn(m, models[m], data[s], samples[m]) for m in METHODS for s in SCORINGS},
        args.eval_warmup,
        args.eval_steps,
    )
    train_s = {k: summary(v) for k, v in train.items()}
    eval_s = {k: summary([t / b for t in v]) for k, v in evals.items()}  # per question
    return {
        "task": task_name,
        "split": split_for(task_name, b),
        "n_options": get_task(task_name, data_root=args.data_root).n_options,
        "batch_shape": {s: list(data[s]["batch"]["input_ids"].shape) for s in SCORINGS},
        "n_truncated": {s: data[s]["n_truncated"] for s in SCORINGS},
        "tokens": counts,
        "train_step_s": train_s,
        "train_cloze_over_letter": {m: _ratio(train_s, m) for m in METHODS},
        "eval_s_per_question": eval_s,
        "eval_samples": samples,
        "eval_cloze_over_letter": {m: _ratio(eval_s, m) for m in METHODS},
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    base, tokenizer = load_base(SETTINGS[args.setting])
    models = build_models(base)
    opts = {
        m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)
        for m, model in models.items()
    }
    rows = [measure_task(t, models, opts, tokenizer, args) for t in args.tasks]
    return {
        "machine": machine_info(CPU),
        "config": {
            "setting": args.setting,
            "model": SETTINGS[args.setting].model,
            "dtype": "float32",
            "targets": TARGETS,
            "lora_r": 8,
            "lora_alpha": 16,
            "kl_weight": KL_WEIGHT,
            "adamw": ADAMW,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "warmup": args.warmup,
            "steps": args.steps,
            "eval_warmup": args.eval_warmup,
            "eval_steps": args.eval_steps,
            "blob_eval_samples": args.samples,
            "attn_implementation": getattr(base.config, "_attn_implementation", None),
        },
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# report


def _n(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}"


def _spread(s: dict[str, float], scale: float = 1.0) -> str:
    return f"{s['median'] * scale:.3g} ({s['min'] * scale:.3g}-{s['max'] * scale:.3g})"


def tables(report: dict[str, Any]) -> str:
    train_rows, eval_rows, token_rows = [], [], []
    for r in report["rows"]:
        c, tok = r["tokens"]["options_mean"], r["tokens"]
        for m in METHODS:
            ts, ratio = r["train_step_s"], r["train_cloze_over_letter"][m]
            train_rows.append(
                [
                    r["task"],
                    m,
                    _spread(ts[f"{m}/letter"]),
                    _spread(ts[f"{m}/cloze"]),
                    f"{ratio:.2f}",
                    _n(c),
                    "yes" if ratio <= c else "no",
                    f"{tok['letter_tokens']:.1f}",
                    f"{tok['cloze_packed_tokens']:.1f}",
                ]
            )
            es, ratio = r["eval_s_per_question"], r["eval_cloze_over_letter"][m]
            n = r["eval_samples"][m]
            eval_rows.append(
                [
                    r["task"],
                    "lora (1 pass)" if n == 0 else f"{m} N={n}",
                    _spread(es[f"{m}/letter"]),
                    _spread(es[f"{m}/cloze"]),
                    f"{ratio:.2f}",
                    _n(c),
                    "yes" if ratio <= c else "no",
                ]
            )
        token_rows.append(
            [
                r["task"],
                _n(c),
                f"{tok['letter_tokens']:.1f}",
                f"{tok['cloze_shared_tokens']:.1f}",
                f"{tok['cloze_packed_tokens']:.1f}",
                f"{tok['cloze_unpacked_tokens']:.1f}",
                f"{tok['packing_saves_tokens']:.1f}",
                f"{tok['packed_over_unpacked']:.2f}",
            ]
        )
    ratio_cols = ["cloze / letter", "options", "<= options x"]
    return "\n\n".join(
        [
            "Training step (s per step of the batch, median (min-max)):",
            format_table(
                [
                    "task",
                    "method",
                    "letter s",
                    "cloze s",
                    *ratio_cols,
                    "letter tok/q",
                    "cloze tok/q",
                ],
                train_rows,
            ),
            "Evaluation pass (s per question, median (min-max)):",
            format_table(["task", "predictive", "letter s/q", "cloze s/q", *ratio_cols], eval_rows),
            "Tokens per question (mean over the batch):",
            format_table(
                [
                    "task",
                    "options",
                    "letter",
                    "cloze shared prompt",
                    "cloze packed",
                    "cloze unpacked",
                    "packing saves",
                    "packed / unpacked",
                ],
                token_rows,
            ),
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--data-root", default=os.environ.get("BLOB_LORA_DATA"))
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=None, help="default: the setting's")
    p.add_argument("--warmup", type=natural_int, default=None, help="warm-up training steps")
    p.add_argument("--steps", type=positive_int, default=None, help="timed training steps")
    p.add_argument("--eval-warmup", type=natural_int, default=None, help="default: 1")
    p.add_argument("--eval-steps", type=positive_int, default=None, help="default: --steps")
    p.add_argument("--samples", type=positive_int, default=10, help="BLoB's N at evaluation")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "scoring.json")
    args = p.parse_args(argv)
    setting = SETTINGS[args.setting]
    if args.max_length is None:
        args.max_length = setting.max_length
    if args.warmup is None:
        args.warmup = setting.warmup
    if args.steps is None:
        args.steps = setting.steps
    if args.eval_warmup is None:
        args.eval_warmup = min(1, args.warmup)
    if args.eval_steps is None:
        args.eval_steps = args.steps
    if args.steps < 1 or args.eval_steps < 1 or args.batch_size < 1:
        p.error("--steps, --eval-steps and --batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = measure(args)
    atomic_write_json(args.out, report)
    print(tables(report))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
