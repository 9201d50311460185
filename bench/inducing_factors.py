"""What one Bayesian-LoRA factor's weight draw costs, and which of its operations wait for the
device (issue 23).

``bench/train_step.py --setting gpu`` measured Bayesian-LoRA's step on a 7B shape at 1.8-4.3x
LoRA's, a cost that does not grow with the batch: a fixed price per Bayesian layer. A layer's
two factors (``A``: r x in, ``B``: out x r) each draw their weight through 9 x 9 float64
factorisations (``blob_lora.tuners.bayesian_lora.inducing``). This script isolates that draw:

* ``draw``: ``InducingWeight.sample_weight()`` plus ``kl()``, forward and backward, of the A
  and the B factor of one q_proj-sized layer, as the training step runs them, ``--iters``
  times in a row with the queue drained only at the ends (so a host read-back inside shows as
  time);
* ``ops``: the small operations alone, forward and backward, one 9 x 9 float64 matrix:
  ``torch.linalg.cholesky`` (reads its status back), ``torch.linalg.cholesky_ex`` (does not),
  ``torch.cholesky_solve`` and two ``torch.linalg.solve_triangular`` against a 9 x ``in``
  right-hand side;
* ``evaluation draw``: N draws of both factors with autograd off, as an evaluation batch
  makes them, factorising each time or with the factorisations pinned for the pass
  (``Method.frozen``, what ``predict_dataset`` does);
* the ATen operations of one ``draw`` that have no sub-operations (about one kernel launch
  each on a GPU, where a draw's time follows their number, not their arithmetic), and how
  many of them the factorisations alone take (the part a step could batch across layers);
* on CUDA, the operations of one ``draw`` that synchronise with the host, as
  ``torch.cuda.set_sync_debug_mode("warn")`` names them.

    PYTHONPATH=src python bench/inducing_factors.py            # CUDA when present
    .venv/bin/python bench/inducing_factors.py --device cpu    # the same on the CPU

Writes ``bench/out/inducing_factors_<device>.json`` (``--out`` to change it) and prints tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ensure_src_on_path, format_table, machine_info, positive_int, synchronize  # noqa: E402

ensure_src_on_path()

from blob_lora.tuners.bayesian_lora.config import BayesianLoraConfig  # noqa: E402
from blob_lora.tuners.bayesian_lora.inducing import InducingWeight, pinned  # noqa: E402
from blob_lora.utils.atomic import atomic_write_json  # noqa: E402

#: rounds of the two evaluation rows, alternating (the median is reported)
ROUNDS = 5


def per_call(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Milliseconds per call of ``fn`` over ``iters`` calls queued back to back."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters * 1e3


def draw_fn(factors: Sequence[InducingWeight], x: torch.Tensor) -> Callable[[], None]:
    """One training step's use of a layer's factors: draw, KL, a loss through both, backward."""

    def step() -> None:
        a, b = (f.sample_weight() for f in factors)
        loss = (x @ a.T @ b.T).square().mean() + sum(f.kl() for f in factors) * 1e-6
        loss.backward()
        for f in factors:
            for p in f.parameters():
                p.grad = None

    return step


def factorisations_fn(factors: Sequence[InducingWeight]) -> Callable[[], None]:
    """The factorisations alone of a training draw (``_compute_factors`` of both factors),
    forward and backward through a loss that sums them: the part of ``draw_fn`` that does not
    depend on the batch (their count includes the summing, a few operations per factor)."""

    def step() -> None:
        loss = sum(t.sum() for f in factors for t in f._compute_factors())
        loss.backward()
        for f in factors:
            for p in f.parameters():
                p.grad = None

    return step


def eval_draw_fn(factors: Sequence[InducingWeight], n: int) -> Callable[[], None]:
    """An evaluation batch's use of a layer's factors: ``n`` draws of each, autograd off."""

    def draw() -> None:
        with torch.no_grad():
            for f in factors:
                f.sample_weight(n)

    return draw


def op_fns(device: torch.device, width: int) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 16, generator=g, dtype=torch.float64)
    k = (z @ z.T + torch.eye(9, dtype=torch.float64)).to(device).requires_grad_()
    rhs = torch.randn(9, width, generator=g, dtype=torch.float64).to(device)
    factor = torch.linalg.cholesky(k.detach()).requires_grad_()

    def run(expr: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            out = expr()
            out.sum().backward()
            k.grad = factor.grad = None

        return call

    def triangular() -> torch.Tensor:
        half = torch.linalg.solve_triangular(factor, rhs, upper=False)
        return torch.linalg.solve_triangular(factor.mT, half, upper=True)

    return {
        "linalg.cholesky": run(lambda: torch.linalg.cholesky(k)),
        "linalg.cholesky_ex": run(lambda: torch.linalg.cholesky_ex(k)[0]),
        "cholesky_solve": run(lambda: torch.cholesky_solve(rhs, factor)),
        "2 x solve_triangular": run(triangular),
    }


def leaf_ops(step: Callable[[], None]) -> int:
    """ATen operations without sub-operations in one call: on a GPU, about one kernel launch
    each, so the count that a latency-bound draw's time follows (counted on any device)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children)


def syncing_ops(step: Callable[[], None]) -> list[str]:
    """The messages of ``set_sync_debug_mode("warn")`` during one call (CUDA only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    notice = "Synchronization debug mode is a prototype"  # printed once, not a synchronisation
    messages = [str(w.message).split("\n")[0] for w in caught]
    return [m for m in messages if not m.startswith(notice)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--width", type=positive_int, default=4096, help="the layer's in = out (7B: 4096)"
    )
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--iters", type=positive_int, default=50)
    p.add_argument("--eval-samples", type=positive_int, default=4, help="N of an evaluation draw")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = BayesianLoraConfig()
    factors = [
        InducingWeight(args.rank, args.width, cfg).to(device),  # A: r x in
        InducingWeight(args.width, args.rank, cfg).to(device),  # B: out x r
    ]
    x = torch.randn(4, args.width, device=device)
    step = draw_fn(factors, x)
    rows = [["draw (A and B, fwd + bwd)", round(per_call(step, device, args.iters), 3)]]
    evaluation = eval_draw_fn(factors, args.eval_samples)
    n = args.eval_samples
    # the two evaluation rows alternate in rounds, so drift of a shared machine hits both
    unpinned_ms, pinned_ms = [], []
    for _ in range(ROUNDS):
        unpinned_ms.append(per_call(evaluation, device, args.iters))
        with pinned(factors):
            pinned_ms.append(per_call(evaluation, device, args.iters))
    rows.append([f"evaluation draw (A and B, N = {n}, no grad)", round(statistics.median(unpinned_ms), 3)])  # fmt: skip
    rows.append(["evaluation draw, factorisations pinned", round(statistics.median(pinned_ms), 3)])  # fmt: skip
    with pinned(factors):
        pinned_ops = leaf_ops(evaluation)
    eval_ops = leaf_ops(evaluation)
    for name, fn in op_fns(device, args.width).items():
        rows.append([f"{name} (fwd + bwd)", round(per_call(fn, device, args.iters * 4), 3)])
    syncs = syncing_ops(step) if device.type == "cuda" else []
    n_ops = leaf_ops(step)
    factorisation_ops = leaf_ops(factorisations_fn(factors))
    report = {
        "machine": machine_info(device),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "ms_per_call": {name: ms for name, ms in rows},
        "leaf_ops_per_draw": n_ops,
        "leaf_ops_of_its_factorisations": factorisation_ops,
        "leaf_ops_per_evaluation_draw": {"unpinned": eval_ops, "pinned": pinned_ops},
        "syncing_ops_in_one_draw": syncs,
    }
    out = args.out or REPO / "bench" / "out" / f"inducing_factors_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(format_table(["what", "ms per call"], rows))
    print(f"\nATen leaf operations in one draw (forward + backward): {n_ops}")
    print(f"of them its factorisations (with a loss summing them): {factorisation_ops}")
    print(f"in one evaluation draw: {eval_ops}, factorisations pinned: {pinned_ops}")
    if device.type == "cuda":
        print(f"\nhost synchronisations in one draw: {len(syncs)}")
        for message in syncs:
            print(f"  {message}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
