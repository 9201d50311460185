"""Where BLoB's std of A ends after training (issue 19, step 4): quantiles of the elementwise
std per Bayesian layer, read from a run's saved adapter, next to the prior std and the
initial range. A std that learned from the data spreads out across elements and layers; one
set by the KL alone sits at the same value everywhere.

    .venv/bin/python paper/std_report.py paper/out/demo_pilot/runs/arc_easy/blob/seed1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from blob_lora.tuners.blob.layer import std_from_param
from blob_lora.utils.atomic import atomic_write_text

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def std_quantiles(run: Path) -> dict[str, Any]:
    """Per layer: quantiles of the std, its mean |M| (the mean of A) and the element count."""
    adapter = run / "adapter"
    config = json.loads((adapter / "blob_config.json").read_text(encoding="utf-8"))
    blob = config.get("default", config)
    std_param = blob.get("std_param", "square")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    layers: dict[str, Any] = {}
    for key, rho in sorted(weights.items()):
        if "lora_A_rho" not in key:
            continue
        name = key.split(".lora_A_rho")[0].removeprefix("base_model.model.")
        std = std_from_param(rho.double(), std_param).flatten()
        mean_key = key.replace("lora_A_rho", "lora_A").replace(".weight", "") + ".weight"
        mean = weights.get(mean_key)
        q = torch.quantile(std, torch.tensor(QUANTILES, dtype=std.dtype)).tolist()
        layers[name] = {
            "quantiles": dict(zip((f"q{int(100 * p):02d}" for p in QUANTILES), q, strict=True)),
            "mean_abs_M": float(mean.abs().mean()) if mean is not None else None,
            "n": std.numel(),
        }
    return {
        "run": str(run),
        "prior_std": blob.get("prior_std"),
        "init_std": blob.get("init_std"),
        "layers": layers,
    }


def kept_reports(path: Path, replaced: set[str]) -> list[dict[str, Any]]:
    """The reports of ``path`` (an earlier ``--json``) for runs not in ``replaced``."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"--keep {path}: cannot read an earlier report: {exc}") from exc
    if not isinstance(earlier, list) or not all(
        isinstance(r, dict) and "run" in r for r in earlier
    ):
        raise SystemExit(f"--keep {path}: expected the list of reports std_report --json writes")
    return [r for r in earlier if r["run"] not in replaced]


def render(report: dict[str, Any]) -> str:
    eps = report["init_std"]
    lines = [
        f"std of A in {report['run']} (prior std {report['prior_std']}, initial std in "
        f"[{eps**2 / 2:.2e}, {eps**2:.2e}])",
        "",
        "| layer | " + " | ".join(f"q{int(100 * p):02d}" for p in QUANTILES) + " | mean abs M |",
        "|---|" + "---|" * (len(QUANTILES) + 1),
    ]
    for name, row in report["layers"].items():
        qs = " | ".join(f"{v:.4f}" for v in row["quantiles"].values())
        m = row["mean_abs_M"]
        lines.append(f"| {name} | {qs} | {m:.4f} |" if m is not None else f"| {name} | {qs} | – |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="BLoB run folders")
    p.add_argument("--json", type=Path, default=None, help="also write the reports here")
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="an earlier --json report whose runs not given here are kept (first, in their "
        "order): BLoB adapters are not published, so the runs of an earlier machine can only "
        "be read back from their report",
    )
    args = p.parse_args(argv)
    reports = [std_quantiles(r) for r in args.runs]
    if args.keep is not None:
        reports = kept_reports(args.keep, {r["run"] for r in reports}) + reports
    for r in reports:
        print(render(r))
    if args.json:
        atomic_write_text(args.json, json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
