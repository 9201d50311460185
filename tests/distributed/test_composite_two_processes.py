"""A composite method (an ensemble) as the *first* command of a process started by the
documented CPU launch (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu``).

A composite claims its run folder before any ``Accelerator`` exists. ``PartialState()`` alone
ignores ``ACCELERATE_USE_CPU``, so each process took itself for the only one: both claimed the
folder ("not empty and holds no blob-lora run") and the launch failed. The other distributed
tests never saw it because a plain run earlier in the same process had set the state up.
With the same global batch the members must equal a one-process ensemble's to float rounding.
"""

from __future__ import annotations

import json

from blob_lora.cli.main import main
from tests.distributed.test_two_processes import _launch_two
from tests.faults.tiny_run import adapter, base_args, max_abs_diff, one_thread


def _ensemble(assets, out, batch: int) -> list[str]:
    return base_args(
        assets,
        out,
        "--method", "ensemble", "--ensemble-size", "2", "--batch-size", str(batch),
        "--max-steps", "2", "--eval-batch-size", "2",
    )  # fmt: skip


def test_an_ensemble_trains_first_thing_on_two_processes(assets, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    proc = _launch_two([_ensemble(assets, two, 2)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with one_thread():
        assert main(_ensemble(assets, one, 4)) == 0
    for k in ("0", "1"):
        a, b = one / "members" / k, two / "members" / k
        assert json.loads((b / "summary.json").read_text())["world_size"] == 2
        assert max_abs_diff(adapter(a), adapter(b)) <= 1e-6
    (task_dir,) = (two / "eval").iterdir()
    metrics = json.loads((task_dir / "metrics.json").read_text())
    assert metrics["method"] == "ensemble" and metrics["eval_samples"] == 2
