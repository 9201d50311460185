"""How far a run's adapter moved each layer: the Frobenius norm of LoRA's update
``scaling * B A`` per adapted module, read from the run's saved adapter (issue 23).

A method that trains some layers and barely moves others shows it here without a model
forward: Bayesian-LoRA's pilot (``results/bayes_lora_pilot/``) found its Bayesian layers'
updates hundreds of times smaller than its plain v_proj layers'. Any adapter folder whose
``adapter_model.safetensors`` holds PEFT's ``lora_A``/``lora_B`` works (LoRA, BLoB's and
SWAG's means, Bayesian-LoRA's posterior mean); a Bayesian-LoRA layer (one with inducing
parameters) is marked as such. A table first gives each run's range of Bayesian and plain
layers' norms and their ratio; ``--initial-draws K`` adds the Bayesian layers' norms at
initialisation (K fresh draws of their initial posterior mean, the run's saved settings), so
that a layer that never moved shows as one.

    .venv/bin/python paper/update_norms.py paper/out/bayes_lora_pilot/runs/openbookqa/*/seed1 \
        --json results/bayes_lora_pilot/update_norms.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from blob_lora.utils.atomic import atomic_write_text

A_KEY = ".lora_A.weight"
INDUCING = ".lora_inducing_"


def lora_scaling(config: dict[str, Any]) -> float:
    """PEFT's ``scaling`` of the default rank: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def update_norm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    """``||scaling * B A||_F`` through ``tr((B^T B)(A A^T))``: an r x r product, so a head's
    (vocabulary x hidden) update is never formed."""
    a, b = a.double(), b.double()
    return scaling * math.sqrt(max(float(torch.trace((b.T @ b) @ (a @ a.T))), 0.0))


def update_norms(run: Path) -> dict[str, Any]:
    """Per adapted module (its name in the base model): the update's norm and whether the layer
    is a Bayesian-LoRA Bayesian layer."""
    adapter = run / "adapter"
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        weights = load_file(str(adapter / "adapter_model.safetensors"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{run}: no readable adapter folder ({exc})") from exc
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise SystemExit(f"{run}: per-module ranks or alphas are not supported")
    scaling = lora_scaling(config)
    # a Bayesian-LoRA Bayesian layer saves its inducing parameters as <module>.lora_inducing_*
    bayesian = {k.split(INDUCING)[0] for k in weights if INDUCING in k}
    layers: dict[str, Any] = {}
    for key in sorted(weights):
        if not key.endswith(A_KEY):
            continue
        module = key[: -len(A_KEY)]
        b = weights.get(f"{module}.lora_B.weight")
        if b is None:
            raise SystemExit(f"{run}: {key} has no lora_B")
        name = module.removeprefix("base_model.model.")
        layers[name] = {
            "norm": update_norm(weights[key], b, scaling),
            "bayesian": module in bayesian,
            "shape": [int(b.shape[0]), int(b.shape[1]), int(weights[key].shape[1])],
        }
    if not layers:
        raise SystemExit(f"{run}: the adapter holds no lora_A/lora_B pairs")
    return {"run": str(run), "scaling": scaling, "layers": layers}


def initial_norms(report: dict[str, Any], draws: int) -> list[float]:
    """The range (least, most) of the Bayesian layers' update norms at initialisation, over
    ``draws`` draws of their initial posterior mean with the run's saved Bayesian-LoRA
    settings and the report's scaling and layer shapes: what a Bayesian layer that never
    moved would show."""
    from blob_lora.tuners.bayesian_lora.config import BayesianLoraConfig
    from blob_lora.tuners.bayesian_lora.inducing import InducingWeight

    config = BayesianLoraConfig.load(Path(report["run"]) / "adapter")
    shapes = [row["shape"] for row in report["layers"].values() if row["bayesian"]]
    scaling = report["scaling"]
    norms = []
    with torch.no_grad():
        for seed in range(draws):
            torch.manual_seed(seed)
            for d_out, r, d_in in shapes:
                a = InducingWeight(r, d_in, config).mean_weight()
                b = InducingWeight(d_out, r, config).mean_weight()
                norms.append(update_norm(a, b, scaling))
    return [min(norms), max(norms)]


def summary(report: dict[str, Any]) -> dict[str, Any] | None:
    """The range of the Bayesian and of the plain layers' norms and how many times larger
    the plain ones are (least and most), or ``None`` when the run has not both kinds."""
    rows = report["layers"].values()
    bayes = [r["norm"] for r in rows if r["bayesian"]]
    plain = [r["norm"] for r in rows if not r["bayesian"]]
    if not bayes or not plain or min(bayes) <= 0:
        return None
    return {
        "bayesian": [min(bayes), max(bayes)],
        "plain": [min(plain), max(plain)],
        "plain_over_bayesian": [min(plain) / max(bayes), max(plain) / min(bayes)],
    }


def summary_table(reports: list[dict[str, Any]]) -> str:
    lines = [
        "| run | Bayesian layers | at initialisation | plain layers | plain / Bayesian |",
        "|---|---|---|---|---|",
    ]
    for rep in reports:
        s = rep.get("summary")
        if s is None:
            lines.append(f"| {rep['run']} | - | - | - | - |")
            continue
        (b0, b1), (p0, p1), (r0, r1) = s["bayesian"], s["plain"], s["plain_over_bayesian"]
        i = s.get("initial_bayesian")
        init = f"{i[0]:.3g}-{i[1]:.3g}" if i else "-"
        lines.append(
            f"| {rep['run']} | {b0:.3g}-{b1:.3g} | {init} | {p0:.3g}-{p1:.3g} | {r0:.0f}-{r1:.0f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(reports: list[dict[str, Any]]) -> str:
    lines = [summary_table(reports)]
    for rep in reports:
        lines += [
            f"### {rep['run']}",
            "",
            "| module | Bayesian | ‖scaling · B A‖_F |",
            "|---|---|---|",
        ]
        for name, row in rep["layers"].items():
            lines.append(f"| {name} | {'yes' if row['bayesian'] else 'no'} | {row['norm']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders (each with adapter/)")
    p.add_argument("--json", type=Path, default=None, help="also write the reports here")
    p.add_argument(
        "--initial-draws",
        type=int,
        default=0,
        help="also the Bayesian layers' norms at initialisation, over this many draws",
    )
    args = p.parse_args(argv)
    reports = [update_norms(run) for run in args.runs]
    for rep in reports:
        if (s := summary(rep)) is not None:
            rep["summary"] = s
            if args.initial_draws > 0:
                s["initial_bayesian"] = initial_norms(rep, args.initial_draws)
    print(markdown(reports))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(reports, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
