"""Benchmark one training step of BLoB (each flipout mode) against plain PEFT LoRA.

One step = forward (``logits_to_keep=1``), loss, backward, optimiser step, zeroing the grads:

* ``lora``: plain ``peft.get_peft_model``, cross-entropy at the last position, AdamW.
* ``blob-<mode>``: the cheap design of the method doc, section 7: ``NLL + pi * KL`` in one
  backward and one AdamW step over mean, B and std.
* ``blob-token-2pass``: the authors' loop: backward on the NLL, AdamW on mean and B, then a
  second backward on ``pi * KL`` and an SGD step over every trainable tensor (the std is
  stepped only there, on its NLL + KL gradient).
* ``swag-collect``: the ``lora`` step followed by a SWAG-LoRA collection (running first and
  second moments in float64, the last 5 deviations) after *every* step: the upper bound of
  SWAG's training cost (``--method swag`` collects once per epoch by default, and only in the
  second half of training; its other steps are ``lora``'s).
* ``bayesian-lora``: Bayesian-LoRA's step (``--method bayesian-lora``): both factors of its
  Bayesian layers (the default ``--bayes-lora-layers``: q_proj and lm_head here, v_proj plain
  LoRA, as in the authors' code) drawn from their inducing-weight posteriors (one sample for
  the batch, as it trains), ``NLL + pi * 0.1 * KL``, one AdamW over the posterior parameters
  and the plain adapters.
* ``bayesian-lora-every``: the same with every target Bayesian (``--bayes-lora-layers '.*'``,
  the implementation before 2026-12-04).

All methods share one base model. Each gets its own PEFT wrapper, built once and ``unload()``-ed
straight away; its injected layers are then swapped in and out of the base model, so that the
timed steps can be interleaved (lora, blob-token, ..., lora, blob-token, ...) and a drift of
the machine hits every method alike. Peak memory is measured afterwards, one method at a time,
on a freshly wrapped model with nothing else alive (wrap, one warm-up step, one measured step,
unload, free).

Run ``--help`` for the options; ``bench/README.md`` has the command lines and measured tables.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
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
    timed,
)

ensure_src_on_path()

from blob_lora import BlobConfig, get_blob_model, kl_divergence, std_parameters  # noqa: E402
from blob_lora.methods.swag.binding import Binding  # noqa: E402
from blob_lora.methods.swag.posterior import SwagPosterior  # noqa: E402
from blob_lora.tuners.bayesian_lora import (  # noqa: E402
    BayesianLoraConfig,
    get_bayesian_lora_model,
)
from blob_lora.tuners.bayesian_lora import kl_divergence as bayesian_lora_kl  # noqa: E402
from blob_lora.utils.atomic import atomic_write_json, atomic_write_text  # noqa: E402

FLIPOUT_MODES = ("token", "sequence", "shared")
METHODS = (
    "lora",
    *(f"blob-{m}" for m in FLIPOUT_MODES),
    "blob-token-2pass",
    "swag-collect",
    "bayesian-lora",
    "bayesian-lora-every",
)
SWAG_RANK = 5  # SWAG-LoRA's deviation rank K
TARGETS = ["q_proj", "v_proj", "lm_head"]

# AdamW as in the authors' runs (method doc, section 3); the SGD lr is their KL lr.
ADAMW = {"lr": 1e-4, "eps": 1e-6, "weight_decay": 0.0}
KL_SGD_LR = 0.01

TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 256,
    "max_position_embeddings": 512,
}


@dataclass(frozen=True)
class Setting:
    model: str  # "smollm2-135m" (embedded GGUF) or "config:<shape>" (random init from a config)
    device: str
    dtype: torch.dtype
    batch_sizes: tuple[int, ...]
    seq_len: int
    warmup: int
    steps: int


SETTINGS: dict[str, Setting] = {
    "tiny": Setting("config:tiny", "cpu", torch.float32, (2,), 16, 1, 3),
    "cpu": Setting("smollm2-135m", "cpu", torch.float32, (4,), 128, 2, 5),
    "gpu": Setting("config:llama2-7b", "cuda", torch.bfloat16, (4, 16), 300, 3, 10),
}


# ---------------------------------------------------------------------------------------------
# Model and adapters
# ---------------------------------------------------------------------------------------------


def build_base_model(model: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The frozen base: the embedded SmolLM2, or a randomly initialised Llama built in place.

    The config models are created directly on ``device`` in ``dtype`` (no float32 CPU copy of a
    7B model first); the random init runs there too, which takes seconds on a GPU.
    """
    if model.startswith("config:"):
        shape = {"config:tiny": TINY_SHAPE, "config:llama2-7b": LLAMA2_7B_SHAPE}[model]
        torch.manual_seed(0)
        base = random_llama(shape, device, dtype)
    else:
        from blob_lora.models import loading

        base, _ = loading.load_model_and_tokenizer(model, dtype=dtype)
        base = base.to(device)
    base.config.use_cache = False
    base.train()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def lora_config(r: int, alpha: int):
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )


def tuner_layers(base: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)}


def install(base: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put ``modules`` at their qualified names in ``base`` (swap adapters in or out)."""
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, module)


@dataclass
class Variant:
    """One method: its PEFT model, its injected layers and a closure running one step."""

    name: str
    peft_model: nn.Module
    layers: dict[str, nn.Module]
    step: Callable[[torch.Tensor, torch.Tensor], None]
    n_trainable: int
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)


def nll_last_position(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the full vocabulary at the last position only."""
    logits = model(input_ids=ids, logits_to_keep=1, use_cache=False).logits
    return F.cross_entropy(logits[:, -1, :].float(), targets)


def wrap(base: nn.Module, method: str, args: argparse.Namespace) -> Variant:
    """Wrap ``base`` for ``method`` (the layers stay installed; call ``unwrap`` to undo)."""
    from peft import get_peft_model

    torch.manual_seed(args.seed)  # the same A initialisation for every method
    cfg = lora_config(args.rank, args.alpha)
    if method in ("lora", "swag-collect"):
        model = get_peft_model(base, cfg)
    elif method.startswith("bayesian-lora"):
        layers = {"layers": ".*"} if method == "bayesian-lora-every" else {}
        model = get_bayesian_lora_model(base, cfg, BayesianLoraConfig(**layers))
    else:
        mode = method.removeprefix("blob-").removesuffix("-2pass")
        model = get_blob_model(base, cfg, BlobConfig(flipout=mode))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    pi = args.kl_weight

    if method == "lora":
        opt = torch.optim.AdamW(trainable, **ADAMW)

        def step(ids: torch.Tensor, targets: torch.Tensor) -> None:
            nll_last_position(model, ids, targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        optimizers = [opt]
    elif method == "swag-collect":
        opt = torch.optim.AdamW(trainable, **ADAMW)
        binding = Binding.trainable(model)
        posterior = SwagPosterior(binding.layout, SWAG_RANK)
        posterior.to(trainable[0].device)

        def step(ids: torch.Tensor, targets: torch.Tensor) -> None:
            nll_last_position(model, ids, targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            posterior.collect(binding.flat())

        optimizers = [opt]
    elif method.startswith("bayesian-lora"):
        opt = torch.optim.AdamW(trainable, **ADAMW)
        weight = BayesianLoraConfig().kl_weight

        def step(ids: torch.Tensor, targets: torch.Tensor) -> None:
            loss = nll_last_position(model, ids, targets) + pi * weight * bayesian_lora_kl(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        optimizers = [opt]
    elif not method.endswith("-2pass"):
        opt = torch.optim.AdamW(trainable, **ADAMW)

        def step(ids: torch.Tensor, targets: torch.Tensor) -> None:
            loss = nll_last_position(model, ids, targets) + pi * kl_divergence(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        optimizers = [opt]
    else:
        std_ids = {id(p) for p in std_parameters(model)}
        adamw = torch.optim.AdamW([p for p in trainable if id(p) not in std_ids], **ADAMW)
        sgd = torch.optim.SGD(trainable, lr=KL_SGD_LR)

        def step(ids: torch.Tensor, targets: torch.Tensor) -> None:
            nll_last_position(model, ids, targets).backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)  # the std keeps its NLL gradient for the SGD
            (pi * kl_divergence(model)).backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)

        optimizers = [adamw, sgd]
    return Variant(
        name=method,
        peft_model=model,
        layers=tuner_layers(base),
        step=step,
        n_trainable=sum(p.numel() for p in trainable),
        optimizers=optimizers,
    )


def unwrap(base: nn.Module, variant: Variant, originals: dict[str, nn.Module]) -> None:
    """``unload()`` the adapter and check the original modules are back in place."""
    restored = variant.peft_model.unload()
    if restored is not base:
        raise RuntimeError(f"{variant.name}: unload() returned another model than the base")
    if hasattr(base, "peft_config"):  # older PEFT leaves it behind; it confuses a re-wrap
        del base.peft_config
    for name, module in originals.items():
        if base.get_submodule(name) is not module:
            raise RuntimeError(f"{variant.name}: unload() did not restore {name}")
    if tuner_layers(base):
        raise RuntimeError(f"{variant.name}: PEFT layers left in the model after unload()")


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def make_batch(
    vocab: int, batch: int, seq_len: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    targets = torch.randint(0, vocab, (batch,), generator=gen)
    return ids.to(device), targets.to(device)


def time_interleaved(
    base: nn.Module,
    variants: Sequence[Variant],
    originals: dict[str, nn.Module],
    batch: tuple[torch.Tensor, torch.Tensor],
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Step times per method, methods interleaved within every repetition."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    try:
        for rep in range(warmup + steps):
            for v in variants:
                install(base, v.layers)
                t = timed(lambda v=v: v.step(*batch), device)
                if rep >= warmup:
                    times[v.name].append(t)
    finally:
        install(base, originals)
    return times


def measure_memory(
    base: nn.Module,
    method: str,
    originals: dict[str, nn.Module],
    batch: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Peak memory of one step with only this method's adapter alive (after one warm-up step,
    so that the optimiser state exists, as in training)."""
    variant = wrap(base, method, args)
    step = variant.step
    try:
        step(*batch)
        mem = measure_peak_memory(functools.partial(step, *batch), device)
    finally:
        unwrap(base, variant, originals)
        variant.optimizers.clear()
        del variant, step
        release_device_memory(device)
    return mem


def profile_step(variant: Variant, batch: tuple[torch.Tensor, torch.Tensor], device) -> str:
    """Top operators of one step (self time), to see where an overhead comes from."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort_by = "self_device_time_total"
    variant.step(*batch)
    with profile(activities=activities) as prof:
        variant.step(*batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof.key_averages().table(sort_by=sort_by, row_limit=20)


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def run(args: argparse.Namespace) -> dict[str, Any]:
    setting = SETTINGS[args.setting]
    device = torch.device(args.device or setting.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--setting gpu needs CUDA; for a CPU check use --device cpu --tiny-shape")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_name = setting.model
    if args.tiny_shape:
        model_name = "config:tiny"
    batch_sizes = tuple(args.batch_sizes or setting.batch_sizes)
    seq_len = args.seq_len or setting.seq_len
    warmup = setting.warmup if args.warmup is None else args.warmup
    steps = setting.steps if args.steps is None else args.steps
    methods = list(args.methods or METHODS)
    if "lora" not in methods:
        methods.insert(0, "lora")

    print(f"[train_step] setting={args.setting} model={model_name} device={device}", flush=True)
    base = build_base_model(model_name, device, setting.dtype)
    vocab = base.config.vocab_size
    # Long-lived objects (modules, imported code) leave the collector's view: the gc.collect()
    # before each memory measurement then takes milliseconds, not a quarter of a second.
    gc.freeze()

    # One wrapper per method, unloaded at once; its layers are swapped in for each step.
    probe = wrap(base, "lora", args)
    originals = {n: m.get_base_layer() for n, m in probe.layers.items()}
    unwrap(base, probe, originals)
    del probe
    variants = []
    for method in methods:
        v = wrap(base, method, args)
        unwrap(base, v, originals)
        variants.append(v)

    results = []
    profiles: dict[str, str] = {}
    for bs in batch_sizes:
        batch = make_batch(vocab, bs, seq_len, device, args.seed + bs)
        print(f"[train_step] batch {bs} x {seq_len}: timing {warmup}+{steps} steps", flush=True)
        times = time_interleaved(base, variants, originals, batch, warmup, steps, device)
        results.append({"batch_size": bs, "seq_len": seq_len, "times": times})
        if args.profile:
            for v in variants:
                install(base, v.layers)
                try:
                    profiles[f"{v.name} batch {bs}"] = profile_step(v, batch, device)
                finally:
                    install(base, originals)
    n_trainable = {v.name: v.n_trainable for v in variants}
    for v in variants:
        v.optimizers.clear()
    del variants, v
    release_device_memory(device)

    # Memory after all timing: the CPU probe changes malloc settings for the rest of the run.
    for res in results:
        batch = make_batch(vocab, res["batch_size"], seq_len, device, args.seed + res["batch_size"])
        print(f"[train_step] batch {res['batch_size']}: peak memory", flush=True)
        res["memory"] = {
            m: measure_memory(base, m, originals, batch, args, device) for m in methods
        }

    report = {
        "benchmark": "train_step",
        "setting": args.setting,
        "config": {
            "model": model_name,
            "dtype": str(setting.dtype).removeprefix("torch."),
            "rank": args.rank,
            "alpha": args.alpha,
            "targets": TARGETS,
            "seq_len": seq_len,
            "batch_sizes": list(batch_sizes),
            "warmup": warmup,
            "steps": steps,
            "kl_weight": args.kl_weight,
            "adamw": ADAMW,
            "kl_sgd_lr": KL_SGD_LR,
            "methods": methods,
            "trainable_params": n_trainable,
            "seed": args.seed,
        },
        "machine": machine_info(device),
        "results": [],
    }
    tables = []
    for res in results:
        rows = _rows(res, methods)
        report["results"].append(
            {"batch_size": res["batch_size"], "seq_len": res["seq_len"], "rows": rows}
        )
        tables.append(
            f"batch {res['batch_size']} x {res['seq_len']} tokens "
            f"({report['machine']['device_name']})\n\n" + _table(rows)
        )
    report["tables_markdown"] = tables
    out = Path(args.out or REPO / "bench" / "out" / f"train_step_{args.setting}.json")
    atomic_write_json(out, report)
    if profiles:
        text = "\n\n".join(f"== {k} ==\n{v}" for k, v in profiles.items())
        atomic_write_text(out.with_suffix(".profile.txt"), text)
    print("\n\n".join(tables))
    print(f"\n[train_step] wrote {out}")
    return report


def _rows(res: dict[str, Any], methods: Sequence[str]) -> list[dict[str, Any]]:
    lora_time = summary(res["times"]["lora"])["median"]
    lora_mem = res["memory"]["lora"]
    lora_growth = lora_mem["peak_bytes"] - lora_mem["before_bytes"]
    rows = []
    for m in methods:
        t = summary(res["times"][m])
        mem = res["memory"][m]
        growth = mem["peak_bytes"] - mem["before_bytes"]
        rows.append(
            {
                "method": m,
                "times_s": res["times"][m],
                "median_s": t["median"],
                "min_s": t["min"],
                "max_s": t["max"],
                "time_ratio": ratio(t["median"], lora_time),
                "mem_kind": mem["kind"],
                "mem_before_bytes": mem["before_bytes"],
                "peak_bytes": mem["peak_bytes"],
                "peak_ratio": ratio(mem["peak_bytes"], lora_mem["peak_bytes"]),
                "step_growth_bytes": growth,
                "growth_ratio": ratio(growth, lora_growth),
            }
        )
    return rows


def _table(rows: Sequence[dict[str, Any]]) -> str:
    mib = 1024.0**2
    header = [
        "method",
        "step s (median)",
        "min-max s",
        "time / LoRA",
        "peak MiB",
        "peak / LoRA",
        "step growth MiB",
        "growth / LoRA",
    ]
    body = [
        [
            r["method"],
            r["median_s"],
            f"{r['min_s']:.3g}-{r['max_s']:.3g}",
            r["time_ratio"],
            r["peak_bytes"] / mib,
            r["peak_ratio"],
            r["step_growth_bytes"] / mib,
            r["growth_ratio"],
        ]
        for r in rows
    ]
    return format_table(header, body)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    p.add_argument("--device", help="override the setting's device (e.g. cpu for a dry run)")
    p.add_argument(
        "--tiny-shape",
        action="store_true",
        help="use a tiny Llama config instead of the setting's model (same code path)",
    )
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", help="override the batch sizes")
    p.add_argument("--seq-len", type=positive_int, help="override the sequence length")
    p.add_argument("--warmup", type=natural_int, help="untimed steps per method before timing")
    p.add_argument(
        "--steps", type=positive_int, help="timed steps per method (the median is reported)"
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, help="subset (lora always runs)")
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--alpha", type=positive_int, default=16)
    p.add_argument("--kl-weight", type=float, default=1e-3, help="pi (does not change the cost)")
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one step per method; top ops go to <out>.profile.txt",
    )
    p.add_argument("--out", help="JSON path (default bench/out/train_step_<setting>.json)")
    args = p.parse_args(argv)
    for name in ("warmup", "steps", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "warmup" else 0):
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    try:
        report = run(parse_args(argv))
    finally:
        gc.unfreeze()  # let a caller that runs several benchmarks free this one's model
        gc.collect()
    return report


if __name__ == "__main__":
    main()
