"""How far the data *could* set BLoB's std of A (issue 19, step 4): the per-element posterior
std that the training data imply at a trained run's mean weights, against the prior.

For a Gaussian mean-field posterior over the elements ``a_j`` of A, the ELBO's optimum (the
Laplace / natural-gradient fixed point) has precision ``1 / sigma_j^2 = 1 / sigma_p^2 +
n F_jj``, with ``F_jj`` the Fisher information of one training example along ``a_j`` and ``n``
the number of examples the likelihood counts. An element whose ``n F_jj`` is far below
``1 / sigma_p^2`` has a posterior std equal to the prior's whatever the optimiser does: the
data cannot set it. This script measures ``F_jj`` on ``--examples`` of the run's own training
questions (the exact Fisher of the categorical predictive over the options, ``sum_c p_c
(d log p_c / d a_j)^2``: the generalised Gauss-Newton diagonal, not the empirical Fisher, which
vanishes where the model fits its labels), at the run's mean weights (BLoB: sampling off), and
reports per layer the quantiles of the implied std

* for the exact ELBO, ``n`` = the training set's size, and
* for the run's own objective (BLoB runs): ``n_eff = 1 / mean(pi)`` over the run's logged KL
  weights (the objective ``NLL_mean + pi KL`` per step weighs the KL like an ELBO of ``n_eff``
  examples; the paper's rescaled cycle counts ~260 of ARC-E's 2,251),

beside the run's learned std (BLoB runs) and the fraction of elements the data pull below
90 % and 50 % of the prior std.

    OMP_NUM_THREADS=2 .venv/bin/python paper/std_curvature.py RUN [--examples 200] \
        [--prior-std 0.2] [--out std_curvature.json]

LoRA runs have no prior: ``--prior-std`` (default BLoB's 0.2) and only the exact ELBO column.
``--factor B`` measures the elements of ``B`` instead, under the same prior: what a posterior
over ``B`` (not BLoB's) would get from the same data.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from blob_lora.models.forward import answer_logits
from blob_lora.training.saved_run import load_run
from blob_lora.tuners.blob import blob_layers, sampling
from blob_lora.tuners.blob.layer import std_from_param
from blob_lora.utils.atomic import atomic_write_json
from std_gradients import training_inputs  # a sibling script, on sys.path as paper/

QUANTILES = (0.01, 0.5, 0.99)


def mean_a_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The mean of A of every adapted layer (LoRA's ``lora_A``; BLoB's mean ``M``), by layer."""
    return factor_parameters(model, "A")


def factor_parameters(model: torch.nn.Module, factor: str) -> dict[str, torch.nn.Parameter]:
    """``lora_A`` (``factor`` "A") or ``lora_B`` ("B") of every adapted layer, by layer."""
    marker = f".lora_{factor}."
    out = {}
    for name, p in model.named_parameters():
        if marker in name and name.endswith(".weight"):
            out[name.split(marker)[0].removeprefix("base_model.model.")] = p
    return out


def b_rms(model: torch.nn.Module) -> dict[str, float]:
    """RMS of every adapted layer's ``B``: A's effect on the output, and so the data's
    curvature along A, scales with it."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_B." in name and name.endswith(".weight"):
            key = name.split(".lora_B.")[0].removeprefix("base_model.model.")
            out[key] = float(p.detach().double().pow(2).mean().sqrt())
    return out


def fisher_diagonal(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    inputs: Any,
    positions: list[int],
) -> dict[str, torch.Tensor]:
    """Mean over ``positions`` of the exact Fisher diagonal of one question's option
    distribution, ``sum_c p_c g_c^2`` with ``g_c`` the gradient of ``log p_c``."""
    names, tensors = list(params), list(params.values())
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for i in positions:
        batch = inputs.collator([inputs.dataset[i]])
        logp = torch.log_softmax(answer_logits(model, batch, inputs.option_ids)[0].double(), -1)
        probs = logp.detach().exp()
        for c in range(logp.numel()):
            grads = torch.autograd.grad(logp[c], tensors, retain_graph=c + 1 < logp.numel())
            for n, g in zip(names, grads, strict=True):
                total[n] += probs[c] * g.double().pow(2)
    return {n: t / len(positions) for n, t in total.items()}


def kl_examples(run: Path) -> float | None:
    """``1 / mean(pi)`` over the run's logged steps; None when it never weighed a KL."""
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    weights = [r["pi"] for r in rows if r.get("pi") is not None]
    mean = sum(weights) / len(weights) if weights else 0.0
    return 1.0 / mean if mean > 0 else None


def implied_std(fisher: torch.Tensor, n: float, prior_std: float) -> torch.Tensor:
    return (1.0 / prior_std**2 + n * fisher).rsqrt()


def summarise(values: torch.Tensor) -> list[float]:
    flat = values.flatten().double()
    return torch.quantile(flat, torch.tensor(QUANTILES, dtype=flat.dtype)).tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--prior-std", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="which training questions are used")
    p.add_argument(
        "--factor",
        choices=("A", "B"),
        default="A",
        help="the factor whose elements are measured: A (BLoB's Bayesian one) or B (what a "
        "posterior over B would see; same prior std)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = analyse(
        args.run,
        load_run(args.run),
        args.examples,
        prior_std=args.prior_std,
        seed=args.seed,
        factor=args.factor,
    )
    print(markdown(result))
    if args.out is not None:
        atomic_write_json(args.out, result)
    return 0


def analyse(
    run: Path,
    loaded: Any,
    examples: int,
    *,
    prior_std: float | None = None,
    seed: int = 0,
    factor: str = "A",
) -> dict[str, Any]:
    """The module doc's measurement on ``loaded`` (``load_run(run)``), per layer, along the
    elements of ``factor`` (A: the learned std beside it; B: no std to compare)."""
    cfg, model = loaded.config, loaded.model
    bayesian = any(True for _ in blob_layers(model))
    prior_std = prior_std or (cfg.blob.prior_std if bayesian else 0.2)
    inputs = training_inputs(loaded)
    n_train = len(inputs.dataset)
    positions = sorted(random.Random(seed).sample(range(n_train), min(examples, n_train)))
    params = factor_parameters(model, factor)
    for q in model.parameters():
        q.requires_grad_(False)
    for q in params.values():
        q.requires_grad_(True)
    model.eval()
    with sampling(model, False):
        fisher = fisher_diagonal(model, params, inputs, positions)
    n_eff = kl_examples(run) if bayesian else None
    learned = {}
    if bayesian and factor == "A":
        for name, layer in blob_layers(model):
            adapter = next(iter(layer.lora_A_rho))
            key = name.removeprefix("base_model.model.")
            learned[key] = std_from_param(
                layer.lora_A_rho[adapter].detach(), layer.blob_std_param[adapter]
            )
    b_sizes = b_rms(model)
    layers = {}
    for name, f in fisher.items():
        exact = implied_std(f, n_train, prior_std)
        row: dict[str, Any] = {
            "elements": f.numel(),
            "b_rms": b_sizes.get(name),
            "fisher_q": summarise(f),
            "exact_std_q": summarise(exact),
            "exact_below_90pct": float((exact < 0.9 * prior_std).double().mean()),
            "exact_below_50pct": float((exact < 0.5 * prior_std).double().mean()),
        }
        if n_eff is not None:
            run_std = implied_std(f, n_eff, prior_std)
            row["run_objective_std_q"] = summarise(run_std)
            row["run_objective_below_90pct"] = float((run_std < 0.9 * prior_std).double().mean())
        if name in learned:
            row["learned_std_q"] = summarise(learned[name])
            row["learned_vs_exact_corr"] = _corr(learned[name], exact)
        layers[name] = row
    return {
        "run": str(run),
        "task": cfg.data.task,
        "factor": factor,
        "examples": len(positions),
        "n_train": n_train,
        "n_eff": n_eff,
        "prior_std": prior_std,
        "layers": layers,
    }


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.flatten().double(), b.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x.pow(2).sum()) * float(y.pow(2).sum()))
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def markdown(result: dict[str, Any]) -> str:
    q = "-".join(f"q{int(v * 100):02d}" for v in QUANTILES)
    n_eff = result["n_eff"]
    lines = [
        f"{result['run']} ({result['task']}), elements of {result['factor']}: Fisher on "
        f"{result['examples']} of {result['n_train']} training questions, prior std "
        f"{result['prior_std']}"
        + (f", n_eff of the run's KL weights {n_eff:.0f}" if n_eff else ""),
        "",
        f"| layer | elements | RMS of B | implied std, exact ELBO ({q}) | < 0.9 prior | < 0.5 prior | "
        f"implied std, run's objective ({q}) | learned std ({q}) | corr(learned, implied) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(values: list[float] | None) -> str:
        return "–" if values is None else " / ".join(f"{v:.4f}" for v in values)

    for name, row in result["layers"].items():
        short = name.replace("model.layers.", "L").replace(".self_attn.", ".")
        corr = row.get("learned_vs_exact_corr")
        lines.append(
            f"| {short} | {row['elements']} | {row['b_rms']:.4f} | {fmt(row['exact_std_q'])} | "
            f"{100 * row['exact_below_90pct']:.1f} % | {100 * row['exact_below_50pct']:.1f} % | "
            f"{fmt(row.get('run_objective_std_q'))} | {fmt(row.get('learned_std_q'))} | "
            f"{'–' if corr is None else f'{corr:.2f}'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
