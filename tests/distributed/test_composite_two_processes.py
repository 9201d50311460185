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

import pytest

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


def test_laplace_fits_on_the_main_process_and_both_processes_score_with_it(
    assets, tmp_path
) -> None:
    """The fit runs on the main process alone (``on_main(..., patient=True)``) while the other
    waits; both then score with the fitted posterior. Same global batch as one process: the
    same MAP to float rounding, so the same fit and metrics."""
    one, two = tmp_path / "one", tmp_path / "two"

    def laplace(out, batch: int) -> list[str]:
        return base_args(
            assets, out, "--method", "laplace", "--batch-size", str(batch), "--max-steps", "2",
            "--eval-batch-size", "2",
        )  # fmt: skip

    proc = _launch_two([laplace(two, 2)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with one_thread():
        assert main(laplace(one, 4)) == 0
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["world_size"] == 2
    f1, f2 = s1["laplace"], s2["laplace"]
    assert f2["n_data"] == f1["n_data"] == 16  # the whole training set, fitted once
    assert f2["prior_precision"] == pytest.approx(f1["prior_precision"], rel=1e-6)
    assert f2["log_marginal_likelihood"] == pytest.approx(f1["log_marginal_likelihood"], rel=1e-6)
    m1, m2 = (
        json.loads(next((d / "eval").iterdir()).joinpath("metrics.json").read_text())
        for d in (one, two)
    )
    # every question scored once (no example repeated to fill the last batch), with the
    # posterior's 100 samples; which sample meets which question differs with the processes
    assert m1["n_examples"] == m2["n_examples"] == 7
    assert m1["eval_samples"] == m2["eval_samples"] == 100
    assert m2["nll"] == pytest.approx(m1["nll"], abs=0.1)
