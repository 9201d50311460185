"""Bayesian-LoRA on two CPU processes (DDP over gloo, ``accelerate launch``) against one process,
on a user's own JSONL task folder, in the authors' layout (q_proj Bayesian, v_proj plain LoRA).

Weight noise is drawn per process, so a default run cannot match a one-process run. Clamping
``lambda`` and the std of ``q(U)`` to 1e-30 scales every draw's noise far below float32's
resolution of the weights it is added to (and the clamps stop their gradients), while every
other inducing parameter (``Z_r``, ``Z_c``, ``D_r``, ``D_c``, the mean of ``q(U)``) still
trains through the likelihood and the KL. The two runs then optimise the same objective on the
same global batches, and must agree to float rounding: this checks that every inducing
parameter's gradient is averaged across processes and that the KL weight (1 / batches per
epoch, 1/4 here) follows the global batch, not one process's batch (16 examples in batches of
2 would give 1/8). Evaluation scores every example once, and the sampled predictive agrees.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from blob_lora.cli.main import main
from tests.distributed.test_two_processes import _launch_two
from tests.faults.tiny_run import N_EVAL, adapter, base_args, max_abs_diff, one_thread, train_log

ATOL = 1e-6
NO_NOISE = "1e-30"


def _bayes_lora(assets, out: Path, batch: int) -> list[str]:
    # 16 examples: 4 steps of global batch 4 are one epoch
    return base_args(
        assets,
        out,
        "--method", "bayesian-lora", "--batch-size", str(batch), "--max-steps", "4",
        "--lr", "1e-3", "--eval-samples", "2", "--eval-batch-size", "2",
        "--kl-schedule", "uniform", "--kl-rescale", "false",  # the authors' KL weight
        "--bayes-lora-init-lamda", NO_NOISE, "--bayes-lora-max-lamda", NO_NOISE,
        "--bayes-lora-init-u-std", NO_NOISE, "--bayes-lora-max-u-std", NO_NOISE,
    )  # fmt: skip


def test_bayesian_lora_on_two_processes_equals_one_process(assets, tmp_path) -> None:
    one, two, early = tmp_path / "one", tmp_path / "two", tmp_path / "early"
    with one_thread():
        assert main(_bayes_lora(assets, one, 4)) == 0
        # the same run stopped after one step: a parameter that never trains equals its
        # initial value in both
        assert main([*_bayes_lora(assets, early, 4), "--max-steps", "1"]) == 0
    proc = _launch_two([_bayes_lora(assets, two, 2)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2

    a, b, start = adapter(one), adapter(two), adapter(early)
    assert a.keys() == b.keys()
    inducing = [k for k in a if "z_row" in k]
    plain = [k for k in a if "v_proj" in k and "lora_A" in k]
    assert inducing and plain  # both kinds of layer are in the comparison
    # every kind of parameter trained (agreeing is not agreeing on initial values): steps 2-4
    # moved them by (measured) 1e-3 (Z, the mean of q(U), the LoRA factors) and 4e-6 to 3e-5
    # (the diagonals D, whose gradients pass through D^2 ~ 1e-6)
    for part in ("z_row", "z_col", "u_mean", "lora_A", "lora_B", "d_row_raw", "d_col_raw"):
        keys = [k for k in a if part in k]
        moved = max(max_abs_diff({k: a[k]}, {k: start[k]}) for k in keys)
        assert moved > (10 * ATOL if part.startswith(("z_", "u_", "lora_")) else 0.0), part
    # ... and the two runs agree to float rounding (measured <= 6e-8)
    assert max_abs_diff(a, b) <= ATOL

    log_one, log_two = train_log(one), train_log(two)
    assert [r["step"] for r in log_one] == [r["step"] for r in log_two] == [1, 2, 3, 4]
    for r1, r2 in zip(log_one, log_two, strict=True):
        assert r1["pi"] == r2["pi"] == 0.25  # 1 / (4 global batches per epoch)
        assert math.isclose(r1["nll"], r2["nll"], rel_tol=1e-5)
        assert math.isclose(r1["kl"], r2["kl"], rel_tol=1e-5)

    (task_dir,) = (two / "eval").iterdir()  # named after the task folder's path
    metrics = json.loads((task_dir / "metrics.json").read_text())
    assert metrics["method"] == "bayesian-lora" and metrics["eval_samples"] == 2
    assert metrics["n_examples"] == N_EVAL
    assert len((task_dir / "predictions.jsonl").read_text().splitlines()) == N_EVAL
    (task_one,) = (one / "eval").iterdir()
    nll_one = json.loads((task_one / "metrics.json").read_text())["nll"]
    assert math.isclose(metrics["nll"], nll_one, rel_tol=1e-5)
