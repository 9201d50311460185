"""The spread of ``make demo``'s numbers over seeds (issue 19, item 5): reads the
``demo_results.json`` of demo runs made with ``blob-lora demo --seed S --out DIR`` and prints
a Markdown table, mean ± sample std over the runs, plus BLoB - LoRA per seed, so a reader can
see whether the gap is larger than seed noise.

    for s in 1 2 3; do blob-lora demo --seed $s --out runs/demo_seed$s; done
    python paper/demo_spread.py runs/demo_seed1 runs/demo_seed2 runs/demo_seed3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

METRICS = (("accuracy", "ACC"), ("mean_confidence", "conf"), ("ece", "ECE"), ("nll", "NLL"))


def _load(run: Path) -> dict[str, Any]:
    return json.loads((run / "demo_results.json").read_text(encoding="utf-8"))


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def render(demos: list[dict[str, Any]]) -> str:
    runs = [d["results"] for d in demos]
    tasks = list(runs[0]["lora"]["eval"])
    head = " | ".join(f"{t} {label}" for t in tasks for _, label in METRICS)
    lines = [f"| method | {head} |", "|---|" + "---|" * (len(tasks) * len(METRICS))]
    for method in runs[0]:
        cells = [
            _cell([r[method]["eval"][t][key] for r in runs]) for t in tasks for key, _ in METRICS
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    gaps = [
        _cell([r["blob"]["eval"][t][key] - r["lora"]["eval"][t][key] for r in runs])
        for t in tasks
        for key, _ in METRICS
    ]
    lines.append("| blob - lora (per seed) | " + " | ".join(gaps) + " |")
    walls = [d["wall_seconds"] for d in demos]
    lines += ["", f"wall time per demo: {_cell(walls)} s over {len(demos)} runs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args(argv)
    print(render([_load(r) for r in args.runs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
