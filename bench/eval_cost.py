"""The evaluation (prediction) cost per question of each method beside plain LoRA (issue 23).

For every method of ``--methods`` (default: lora, blob, mc-dropout, swag, bayesian-lora) a run
is trained for a few steps with the project's trainer (``blob_lora.pipeline.train``, the code
``blob-lora train`` runs; evaluation off), then re-opened with
``blob_lora.training.saved_run.load_run`` and evaluated with
``blob_lora.evaluation.evaluate.evaluate_on_task`` on the same fixed questions of one task,
with the arguments ``blob-lora evaluate --run RUN`` passes: the method's own default number of
samples (``Method.eval_samples(model, None)``: nothing is hard-coded here), the run's
``max_length``, scoring, eval noise and cache folder, the frozen-prefix cache on. The weights'
values do not matter for the cost; the code path is the real one.

Each repetition evaluates every method once, the order alternating (A, B, C, then C, B, A), so
drift of a shared machine hits every method alike. Per method and repetition two times are
taken from the same call: the whole ``evaluate_on_task`` (tokenising the split, the
predictive, the metrics, predictions.jsonl and the two plots: what a user waits for) and,
inside it, the predictive alone (``predict_dataset``, the forwards). Reported: the median
seconds per question of each, the ratio of the medians to LoRA's, the CPU seconds of the
process (the steadier number on a busy machine) and, from one more untimed pass per method,
the samples N, the forward passes per batch and the sequences per question that ran through
the top and the bottom transformer block (the prefix cache runs the bottom once), and the peak
memory of the pass (CPU: sampled RSS, approximate; CUDA: exact), and the tokens, padding
included, that the top block ran over (``top tokens/q``). ``--batch-order both`` times every
method twice in the same rounds, in batches of similar length (what ``evaluate_on_task`` does
by default) and in the split's order (``<method> (split order)``), and reports the ratio
(``over_split_order``).

    OMP_NUM_THREADS=2 BLOB_LORA_DATA=../shared/data .venv/bin/python bench/eval_cost.py
    .venv/bin/python bench/eval_cost.py --setting tiny                  # seconds, random tiny model
    PYTHONPATH=src python bench/eval_cost.py --setting gpu               # a GPU machine
    .venv/bin/python bench/eval_cost.py --setting gpu --device cpu --tiny-shape   # its dry run

The ``gpu`` setting runs the same code path on a randomly initialised LLaMA-2-7B-shaped Llama
in bf16 on CUDA (no weights need to travel), with the tests' character tokenizer (one token
per character, so the questions are longer in tokens than under a real tokenizer; the report
gives the tokens per question).

Writes ``bench/out/eval_cost_<setting>.json`` and prints a Markdown table; ``--out`` writes
elsewhere (``--out bench/results/eval_cost_cpu.json`` for a run of record).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    summary,
)

ensure_src_on_path()

from blob_lora.evaluation import evaluate as evaluate_module  # noqa: E402
from blob_lora.models.prefix import block_lists  # noqa: E402
from blob_lora.pipeline import train  # noqa: E402
from blob_lora.tasks import get_task  # noqa: E402
from blob_lora.training import TrainConfig  # noqa: E402
from blob_lora.training.saved_run import LoadedRun, load_run  # noqa: E402
from blob_lora.utils.atomic import atomic_write_json  # noqa: E402

DEFAULT_METHODS = ("lora", "blob", "mc-dropout", "swag", "bayesian-lora")
MIB = 1024**2


@dataclass(frozen=True)
class Setting:
    #: "smollm2-135m" (embedded GGUF), "tiny" (random 2-block Llama, char tokenizer) or
    #: "llama2-7b" (random LLaMA-2-7B shape, char tokenizer)
    model: str
    top_blocks: int  # adapted blocks counted from the top (``--targets demo``)
    max_length: int
    n_questions: int
    batch_size: int
    repeats: int
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


SETTINGS = {
    "cpu": Setting("smollm2-135m", 8, 300, 48, 8, 5),
    # the char tokenizer spends a token per character: a longer budget keeps prompts whole
    "tiny": Setting("tiny", 1, 512, 8, 4, 2),
    "gpu": Setting("llama2-7b", 8, 512, 48, 8, 5, device="cuda", dtype=torch.bfloat16),
}
#: the brief training run behind each adapter: 4 steps, so that SWAG collects twice
#: (collection starts after half the steps, ``--swag-every 1``)
TRAIN_STEPS = 4
TRAIN_BATCH = 4


def load_base(setting: Setting, device: torch.device, tiny_shape: bool) -> tuple[nn.Module, Any]:
    """The base model on ``device``: the setting's, or the tests' tiny Llama (``--tiny-shape``)."""
    if setting.model in ("tiny", "llama2-7b"):
        sys.path.insert(0, str(REPO))
        from tests.factories import tiny_base, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        if setting.model == "tiny" or tiny_shape:
            return tiny_base(tokenizer).to(device=device, dtype=setting.dtype), tokenizer
        base = random_llama(
            LLAMA2_7B_SHAPE, device, setting.dtype, pad_token_id=tokenizer.pad_token_id
        )
        return base.eval(), tokenizer
    from blob_lora.models import load_model_and_tokenizer

    return load_model_and_tokenizer(setting.model, dtype=torch.float32)


def target_modules(targets: str, num_layers: int, top_blocks: int) -> list[str]:
    """``all``: q/v of every block + ``lm_head``; ``demo``: q/v of the top blocks + ``lm_head``
    (``blob-lora demo``'s targets, the same regular expression as ``train_full_step.py``)."""
    if targets == "all":
        return ["q_proj", "v_proj", "lm_head"]
    blocks = "|".join(str(i) for i in range(max(0, num_layers - top_blocks), num_layers))
    return [rf".*\.layers\.({blocks})\.self_attn\.(q_proj|v_proj)|.*lm_head"]


def train_config(
    args: argparse.Namespace, setting: Setting, method: str, out: Path, num_layers: int
) -> TrainConfig:
    return TrainConfig(
        model=setting.model,
        task=args.task,
        method=method,
        out=str(out),
        data_root=args.data_root,
        train_split=f"train[:{TRAIN_STEPS * TRAIN_BATCH}]",
        max_steps=TRAIN_STEPS,
        batch_size=TRAIN_BATCH,
        eval_batch_size=args.batch_size or setting.batch_size,
        max_length=args.max_length or setting.max_length,
        scoring=args.scoring,
        target_modules=target_modules(args.targets, num_layers, setting.top_blocks),
        swag_every=1,
        evaluate=False,
        eval_tasks=[],
        seed=args.seed,
    )


def trained_run(cfg: TrainConfig, base: nn.Module, tokenizer: Any) -> LoadedRun:
    """Train ``cfg`` on a copy of ``base``, then re-open the run as ``blob-lora evaluate`` does."""
    train(cfg, progress=False, base_model=copy.deepcopy(base), tokenizer=tokenizer)
    gc.collect()
    return load_run(Path(cfg.out), base_model=copy.deepcopy(base), tokenizer=tokenizer)


@contextmanager
def timed_predictive(times: list[tuple[float, float]]) -> Iterator[None]:
    """Record (wall, CPU) seconds of every ``predict_dataset`` call ``evaluate_on_task`` makes."""
    real = evaluate_module.predict_dataset

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            if torch.cuda.is_available():  # the queued kernels belong to this call's time
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start, time.process_time() - cpu))

    evaluate_module.predict_dataset = wrapper
    try:
        yield
    finally:
        evaluate_module.predict_dataset = real


@contextmanager
def counted_blocks(model: nn.Module) -> Iterator[dict[str, int]]:
    """Calls of the bottom and top transformer blocks and the sequences they saw."""
    (layers,) = block_lists(model).values()
    counts = {"bottom_calls": 0, "bottom_rows": 0, "top_calls": 0, "top_rows": 0, "top_tokens": 0}

    def hook(where: str):
        def count(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            counts[f"{where}_calls"] += 1
            counts[f"{where}_rows"] += int(hidden.shape[0])
            if where == "top":  # padded positions included: what the matmuls ran over
                counts["top_tokens"] += int(hidden.shape[0]) * int(hidden.shape[1])

        return count

    handles = [
        layers[0].register_forward_pre_hook(hook("bottom"), with_kwargs=True),
        layers[-1].register_forward_pre_hook(hook("top"), with_kwargs=True),
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


class Evaluation:
    """One method's loaded run and the ``evaluate_on_task`` call ``blob-lora evaluate`` makes."""

    def __init__(
        self,
        loaded: LoadedRun,
        task: Any,
        split: str,
        batch_size: int,
        out: Path,
        prefix: bool,
        by_length: bool = True,
    ) -> None:
        self.loaded, self.task, self.split = loaded, task, split
        self.batch_size, self.out, self.prefix = batch_size, out, prefix
        self.by_length = by_length
        cfg = loaded.config
        # what evaluate_on_task will use: the run's --eval-samples, else the method's default
        self.n_samples = loaded.method.eval_samples(loaded.model, cfg.evaluation.eval_samples)

    def __call__(self) -> dict[str, Any]:
        cfg = self.loaded.config
        return evaluate_module.evaluate_on_task(
            self.loaded.model,
            self.loaded.method,
            self.loaded.tokenizer,
            self.task,
            self.out,
            split=self.split,
            n_samples=cfg.evaluation.eval_samples,
            max_length=cfg.data.max_length,
            batch_size=self.batch_size,
            cache_dir=cfg.data.cache_dir,
            scoring=cfg.data.scoring_spec,
            eval_noise=cfg.blob.eval_noise,
            prefix_cache=self.prefix,
            by_length=self.by_length,
        )

    def timed(self) -> tuple[float, float, float, float, dict[str, Any]]:
        """(evaluate wall, evaluate CPU, predictive wall, predictive CPU, metrics)."""
        inner: list[tuple[float, float]] = []
        start, cpu = time.perf_counter(), time.process_time()
        with timed_predictive(inner):
            metrics = self()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        (predictive,) = inner
        return wall, cpu, predictive[0], predictive[1], metrics


def row_label(method: str, by_length: bool, batch_order: str) -> str:
    """A row's name: the method, marked when both batch orders are compared."""
    return method if batch_order != "both" or by_length else f"{method} (split order)"


def safe(label: str) -> str:
    return label.replace(" ", "_").replace("(", "").replace(")", "")


def bench(
    args: argparse.Namespace, setting: Setting, device: torch.device, tmp: Path
) -> dict[str, Any]:
    torch.manual_seed(0)
    base, tokenizer = load_base(setting, device, args.tiny_shape)
    num_layers = int(base.config.num_hidden_layers)
    task = get_task(args.task, data_root=args.data_root)
    n_questions = args.n_questions or setting.n_questions
    split = f"{args.split}[:{n_questions}]"
    batch_size = args.batch_size or setting.batch_size
    evals: dict[str, Evaluation] = {}
    orders = {"length": [True], "split": [False], "both": [True, False]}[args.batch_order]
    for method in args.methods:
        print(f"training {method} ({TRAIN_STEPS} steps)", flush=True)
        cfg = train_config(args, setting, method, tmp / "runs" / method, num_layers)
        loaded = trained_run(cfg, base, tokenizer)
        for by_length in orders:
            label = row_label(method, by_length, args.batch_order)
            evals[label] = Evaluation(
                loaded, task, split, batch_size, tmp / "eval" / safe(label),
                args.prefix_cache == "on", by_length,
            )  # fmt: skip
    del base
    release_device_memory(device)
    repeats, warmup = args.repeats or setting.repeats, args.warmup
    columns = ("eval_wall", "eval_cpu", "pred_wall", "pred_cpu")
    labels = list(evals)
    times: dict[str, dict[str, list[float]]] = {m: {c: [] for c in columns} for m in labels}
    metrics: dict[str, dict[str, Any]] = {}
    for i in range(warmup + repeats):
        order = labels if i % 2 == 0 else labels[::-1]
        line = []
        for method in order:
            *took, metrics[method] = evals[method].timed()
            if i >= warmup:
                for column, value in zip(columns, took, strict=True):
                    times[method][column].append(value)
            line.append(f"{method} {took[0]:.3f}s (predictive {took[2]:.3f}s)")
        what = "warm-up" if i < warmup else "timed"
        print(f"  round {i + 1}/{warmup + repeats} ({what}): " + ", ".join(line), flush=True)
    # one more pass per method, untimed: what it ran and its peak memory
    probes: dict[str, dict[str, Any]] = {}
    for method, evaluation in evals.items():
        with counted_blocks(evaluation.loaded.model) as counts:
            memory = measure_peak_memory(evaluation, device) if args.memory else None
            if memory is None:
                evaluation()
        n_batches = -(-n_questions // batch_size)
        probes[method] = {
            **counts,
            "batches": n_batches,
            "forwards_per_batch": counts["top_calls"] / n_batches,
            "top_rows_per_question": counts["top_rows"] / n_questions,
            "top_tokens_per_question": counts["top_tokens"] / n_questions,
            "bottom_rows_per_question": counts["bottom_rows"] / n_questions,
            "memory": memory,
        }
    rows = []
    lora = "lora" if "lora" in times else labels[0]
    reference = {c: summary(times[lora][c])["median"] for c in columns}
    for method, evaluation in evals.items():
        stats = {c: summary(v) for c, v in times[method].items()}
        probe = probes[method]
        memory = probe.pop("memory")
        row: dict[str, Any] = {
            "method": method,
            "batch_order": "length" if evaluation.by_length else "split",
            "eval_samples": evaluation.n_samples,
            "metrics_eval_samples": metrics[method]["eval_samples"],
            "n_examples": metrics[method]["n_examples"],
            "seconds": stats,
            "times_s": times[method],
            "per_question_s": {c: stats[c]["median"] / n_questions for c in columns},
            "over_reference": {c: stats[c]["median"] / reference[c] for c in columns},
            "prefix_cache": args.prefix_cache,
            **probe,
        }
        if memory is not None:
            row["memory"] = {
                **memory,
                "growth_bytes": memory["peak_bytes"] - memory["before_bytes"],
            }
        rows.append(row)
    by_name = {r["method"]: r for r in rows}
    for r in rows:  # --batch-order both: each method's length-ordered pass over its split-ordered
        partner = by_name.get(f"{r['method']} (split order)")
        if partner is not None:
            r["over_split_order"] = {
                c: r["seconds"][c]["median"] / partner["seconds"][c]["median"] for c in columns
            }
            r["over_split_order"]["top_tokens"] = r["top_tokens"] / partner["top_tokens"]
    if memory_rows := [r for r in rows if "memory" in r]:
        ref = next((r for r in memory_rows if r["method"] == lora), None)
        for r in memory_rows:
            if ref is not None and ref["memory"]["growth_bytes"] > 0:
                r["memory"]["growth_over_reference"] = (
                    r["memory"]["growth_bytes"] / ref["memory"]["growth_bytes"]
                )
    return {
        "reference": lora,
        "n_questions": n_questions,
        "split": split,
        "batch_size": batch_size,
        "num_layers": num_layers,
        "target_modules": target_modules(args.targets, num_layers, setting.top_blocks),
        "rows": rows,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="methods to compare (the first one is the reference when lora is absent)")  # fmt: skip
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--split", default="eval", help="split to evaluate (default: the task's eval)")
    p.add_argument("--n-questions", type=positive_int, default=None,
                   help="questions evaluated (the split's first N; default per setting)")  # fmt: skip
    p.add_argument("--scoring", choices=("letter", "cloze"), default="letter")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="questions per evaluation batch (default per setting)")  # fmt: skip
    p.add_argument(
        "--max-length", type=positive_int, default=None, help="token budget (default per setting)"
    )
    p.add_argument("--targets", choices=("demo", "all"), default="demo",
                   help="LoRA on q/v of the top 8 blocks + lm_head (demo) or of every block")  # fmt: skip
    p.add_argument("--prefix-cache", choices=("on", "off"), default="on",
                   help="the frozen-prefix cache of evaluation (blob-lora evaluate: on)")  # fmt: skip
    p.add_argument("--batch-order", choices=("length", "split", "both"), default="length",
                   help="evaluation batches of similar length (evaluate_on_task's default), "
                   "the split's own order, or both as separate rows of one run")  # fmt: skip
    p.add_argument("--warmup", type=natural_int, default=1, help="untimed rounds before timing")
    p.add_argument(
        "--repeats", type=positive_int, default=None, help="timed rounds (default per setting)"
    )
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory pass (the block counts are still taken)")  # fmt: skip
    p.add_argument("--device", default=None,
                   help="where the model runs (default per setting: cuda for gpu, else cpu)")  # fmt: skip
    p.add_argument("--tiny-shape", action="store_true",
                   help="gpu: the tests' tiny Llama instead of the 7B shape (a dry run)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-root", default=None, help="offline datasets (else BLOB_LORA_DATA)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if len(set(args.methods)) != len(args.methods):
        p.error("--methods lists a method twice")
    from blob_lora.methods.registry import METHODS

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:  # before the first method trains, not after
        p.error(f"--methods: unknown {unknown}; known: {', '.join(sorted(METHODS))}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setting = SETTINGS[args.setting]
    if args.data_root is None:
        args.data_root = os.environ.get("BLOB_LORA_DATA") or str(REPO.parent / "shared" / "data")
    out_path = args.out or REPO / "bench" / "out" / f"eval_cost_{args.setting}.json"
    load_start = list(os.getloadavg())
    device = torch.device(args.device or setting.device)
    with tempfile.TemporaryDirectory(prefix="eval_cost_") as tmp:
        result = bench(args, setting, device, Path(tmp))
    # no output path in the report (it may be a path of this machine)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "data_root")}
    config.update(
        model="tiny" if args.tiny_shape else setting.model,
        dtype=str(setting.dtype).removeprefix("torch."),
        max_length=args.max_length or setting.max_length,
        n_questions=result["n_questions"],
        batch_size=result["batch_size"],
        repeats=args.repeats or setting.repeats,
        train_steps=TRAIN_STEPS,
        train_batch_size=TRAIN_BATCH,
    )
    load = {"start": load_start, "end": list(os.getloadavg())}
    report = {"machine": machine_info(device), "load_average": load, "config": config, **result}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, report)
    ref = result["reference"]
    header = ["method", "N", "predictive s/q", "min-max s/q", f"x {ref}", "CPU x", "evaluate s/q",
              f"x {ref}", "forwards/batch", "top seq/q", "top tokens/q", "bottom seq/q", "peak MiB",
              "growth MiB", f"growth x {ref}"]  # fmt: skip
    n = result["n_questions"]
    table = []
    for r in result["rows"]:
        pred = r["seconds"]["pred_wall"]
        mem = r.get("memory") or {}
        table.append([
            r["method"], r["eval_samples"], r["per_question_s"]["pred_wall"],
            f"{pred['min'] / n:.3g}-{pred['max'] / n:.3g}",
            round(r["over_reference"]["pred_wall"], 2), round(r["over_reference"]["pred_cpu"], 2),
            r["per_question_s"]["eval_wall"], round(r["over_reference"]["eval_wall"], 2),
            round(r["forwards_per_batch"], 2), round(r["top_rows_per_question"], 2),
            round(r["top_tokens_per_question"], 1), round(r["bottom_rows_per_question"], 2),
            round(mem["peak_bytes"] / MIB) if mem else None,
            round(mem["growth_bytes"] / MIB) if mem else None,
            round(mem["growth_over_reference"], 2) if "growth_over_reference" in mem else None,
        ])  # fmt: skip
    print(format_table(header, table))
    print(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
