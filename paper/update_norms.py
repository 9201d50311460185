"""How far a run's adapter moved each layer: the Frobenius norm of LoRA's update
``scaling * B A`` per adapted module, read from the run's saved adapter (issue 23).

A method that trains some layers and barely moves others shows it here without a model
forward: Bayesian-LoRA's pilot (``results/bayes_lora_pilot/``) found its Bayesian layers'
updates hundreds of times smaller than its plain v_proj layers'. Any adapter folder whose
``adapter_model.safetensors`` holds PEFT's ``lora_A``/``lora_B`` works (LoRA, BLoB's and
SWAG's means, Bayesian-LoRA's posterior mean); a Bayesian-LoRA layer (one with inducing
parameters) is marked as such.

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
        }
    if not layers:
        raise SystemExit(f"{run}: the adapter holds no lora_A/lora_B pairs")
    return {"run": str(run), "scaling": scaling, "layers": layers}


def markdown(reports: list[dict[str, Any]]) -> str:
    lines = []
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
    args = p.parse_args(argv)
    reports = [update_norms(run) for run in args.runs]
    print(markdown(reports))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(reports, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
