"""SWAG-LoRA on two CPU processes (DDP over gloo, ``accelerate launch``) against one process,
on a user's own JSONL task folder.

Every process holds the same adapter, so every process collects the same iterates: with the
same global batch (2 x 2 == 1 x 4) the saved SWA adapter and the saved moments must agree with
the one-process run to float rounding (the gradient all-reduce sums in another order): measured
max differences 4e-9 (adapter), 5e-9 (mean), 1e-8 (deviations, whose entries reach 1e-3), so
1e-7 leaves a margin of 10 while a missed or doubled collection would move them by ~1e-4. And
evaluation must score every example once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blob_lora.cli.main import main
from blob_lora.methods.swag import POSTERIOR_FILE, SwagPosterior
from tests.distributed.test_two_processes import _launch_two
from tests.faults.tiny_run import N_EVAL, adapter, base_args, max_abs_diff, one_thread

ATOL = 1e-7


def _swag(assets, out: Path, batch: int) -> list[str]:
    # 16 examples: 4 steps of global batch 4 per epoch; collection after steps 2, 3, 4
    return base_args(
        assets,
        out,
        "--method", "swag", "--batch-size", str(batch), "--max-steps", "4",
        "--swag-every", "1", "--swag-start", "0.25", "--swag-rank", "3",
        "--eval-samples", "2", "--eval-batch-size", "2",
    )  # fmt: skip


def test_swag_on_two_processes_equals_one_process(assets, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    with one_thread():
        assert main(_swag(assets, one, 4)) == 0
    proc = _launch_two([_swag(assets, two, 2)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert max_abs_diff(adapter(one), adapter(two)) <= ATOL
    a = SwagPosterior.load(one / "adapter" / POSTERIOR_FILE)
    b = SwagPosterior.load(two / "adapter" / POSTERIOR_FILE)
    assert a.count == b.count == 3 and a.deviations.shape == b.deviations.shape == (
        3,
        a.mean.numel(),
    )
    for name in ("mean", "sq_mean", "deviations"):
        diff = (getattr(a, name).double() - getattr(b, name).double()).abs().max().item()
        assert diff <= ATOL, (name, diff)
    assert a.variance().max() > 0  # the iterates moved: a posterior, not a point

    (task_dir,) = (two / "eval").iterdir()  # named after the task folder's path
    metrics = json.loads((task_dir / "metrics.json").read_text())
    assert metrics["method"] == "swag" and metrics["eval_samples"] == 2
    assert metrics["n_examples"] == N_EVAL
    rows = (task_dir / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == N_EVAL
    assert torch.isfinite(torch.tensor(metrics["nll"]))
