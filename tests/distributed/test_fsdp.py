"""FSDP2 on two CPU processes against one process (issue 21.1).

Accelerate enables FSDP on GPU launches only, so the two processes run ``fsdp_driver.py``,
which switches Accelerate's state to FSDP2 on CPU (see its docstring for why and how); the
model is then sharded by Accelerate's own ``fully_shard`` path: every parameter, frozen base and
adapter, is a DTensor shard over gloo. 2 processes x batch 2 see the same examples per step as
1 process x batch 4 (as under DDP), so:

* ``--method lora``: the global-batch NLL of every step (rel. 1e-5) and the final adapter
  (max abs difference <= 1e-6; measured 3e-8) agree, evaluation scores all 7 examples once;
* ``--method blob`` with a tiny posterior std (``--init-std 1e-4``: weight noise ~1e-8, so the
  runs are deterministic to float rounding) and the paper optimiser, whose KL step is a plain
  SGD linear in the KL gradient (``--kl-lr 1e-8``: it moves the std by ~3 % a step): the KL of
  every step (rel. 1e-5), the mean and ``B`` (<= 1e-6) and the std (rel. 1e-5; measured 0)
  agree. A KL counted on one shard only, or summed twice, would change the std by far more
  (``test_the_check_sees_a_wrong_kl_weight``: doubling the KL step moves it by 10 %);
* ``--optimizer single`` at batch 1 x ``--grad-accum 2`` (FSDP's ``no_sync`` path, the KL in
  the loss of each micro-batch): the KL of every step agrees;
* checkpoints hold whole tensors: a 1-process checkpoint resumed under FSDP, and an FSDP one
  resumed on 1 process, both end on the uninterrupted 1-process adapter.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blob_lora.cli.main import main
from tests.distributed.test_two_processes import _interrupted_copy
from tests.faults.tiny_run import (
    N_EVAL,
    adapter,
    base_args,
    cli_env,
    free_port,
    max_abs_diff,
    one_thread,
    train_log,
)

DRIVER = Path(__file__).with_name("fsdp_driver.py")
PARAM_ATOL = 1e-6
STD_RTOL = 1e-5


def _std_rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference between the std parameters of two BLoB adapters."""
    keys = [k for k in a if "lora_A_rho" in k]
    assert keys and set(keys) <= set(b)
    return max(float(((a[k] - b[k]).abs() / a[k].abs()).max()) for k in keys)


def _lora(assets, out, batch, *extra):
    return base_args(
        assets, out, "--method", "lora", "--batch-size", str(batch), "--max-steps", "4",
        "--checkpoint-every", "2", "--eval-samples", "0", "--eval-batch-size", "2", *extra,
    )  # fmt: skip


def _blob(assets, out, batch, *extra):
    return base_args(
        assets, out, "--method", "blob", "--batch-size", str(batch), "--max-steps", "4",
        "--eval-samples", "2", "--eval-batch-size", "2", "--kl-schedule", "uniform",
        "--init-std", "1e-4", "--warmup-ratio", "0", *extra,
    )  # fmt: skip


PAPER = ("--kl-lr", "1e-8")  # the KL step moves the std by ~3 % a step
SINGLE = ("--optimizer", "single", "--std-lr", "1e-5")


def _launch_fsdp(argvs: list[list[str]], tmp: Path) -> subprocess.CompletedProcess:
    spec = tmp / "argv.json"
    spec.write_text(json.dumps(argvs))
    env = cli_env()
    env["ACCELERATE_USE_CPU"] = "1"
    env["HF_HOME"] = str(tmp / "hf-home")  # ignore any personal accelerate default_config.yaml
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
        "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(DRIVER), str(spec),
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fsdp")
    names = ("lora1", "paper1", "single1", "lora2", "paper2", "single2", "on_fsdp", "on_one")
    r = {k: tmp / k for k in names}
    with one_thread():
        assert main(_lora(assets, r["lora1"], 4)) == 0
        assert main(_blob(assets, r["paper1"], 4, *PAPER)) == 0
        assert main(_blob(assets, r["single1"], 4, *SINGLE)) == 0
    _interrupted_copy(r["lora1"], r["on_fsdp"])
    proc = _launch_fsdp(
        [
            _lora(assets, r["lora2"], 2),
            _blob(assets, r["paper2"], 2, *PAPER),
            _blob(assets, r["single2"], 1, *SINGLE, "--grad-accum", "2"),
            _lora(assets, r["on_fsdp"], 2, "--resume"),
        ],
        tmp,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _interrupted_copy(r["lora2"], r["on_one"])
    with one_thread():
        assert main(_lora(assets, r["on_one"], 4, "--resume")) == 0
    return r


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_lora_under_fsdp_equals_one_process(runs) -> None:
    one, two = runs["lora1"], runs["lora2"]
    s1, s2 = _summary(one), _summary(two)
    assert (s1["fsdp"], s1["world_size"]) == (False, 1)
    assert (s2["fsdp"], s2["world_size"]) == (True, 2)  # the model really was sharded
    log1, log2 = train_log(one), train_log(two)
    assert [r["step"] for r in log2] == [1, 2, 3, 4]
    for a, b in zip(log1, log2, strict=True):
        assert math.isclose(a["nll"], b["nll"], rel_tol=1e-5), (a, b)
        assert a["acc"] == b["acc"] and a["lr"] == b["lr"]
    assert max_abs_diff(adapter(one), adapter(two)) <= PARAM_ATOL
    (task,) = s2["evaluations"]
    m1, m2 = s1["evaluations"][task], s2["evaluations"][task]
    assert m1["n_examples"] == m2["n_examples"] == N_EVAL
    assert m1["accuracy"] == m2["accuracy"]
    assert math.isclose(m1["nll"], m2["nll"], rel_tol=1e-5)


def test_blob_kl_is_summed_once_over_the_shards(runs) -> None:
    one, two = runs["paper1"], runs["paper2"]
    assert _summary(two)["fsdp"] is True
    log1, log2 = train_log(one), train_log(two)
    assert [r["pi"] for r in log1] == [r["pi"] for r in log2] and log2[0]["pi"] > 0
    for a, b in zip(log1, log2, strict=True):
        assert math.isclose(a["kl"], b["kl"], rel_tol=1e-5), (a["kl"], b["kl"])
        assert math.isclose(a["nll"], b["nll"], rel_tol=1e-5), (a["nll"], b["nll"])
    assert max_abs_diff(adapter(one), adapter(two)) <= PARAM_ATOL
    assert _std_rel_diff(adapter(one), adapter(two)) <= STD_RTOL
    (task,) = _summary(two)["evaluations"]
    m = _summary(two)["evaluations"][task]
    assert m["n_examples"] == N_EVAL and m["eval_samples"] == 2


def test_single_optimizer_with_accumulation_under_fsdp(runs) -> None:
    one, two = runs["single1"], runs["single2"]
    assert _summary(two)["fsdp"] is True
    for a, b in zip(train_log(one), train_log(two), strict=True):
        assert a["pi"] == b["pi"]
        assert math.isclose(a["kl"], b["kl"], rel_tol=1e-5), (a["kl"], b["kl"])
        assert math.isclose(a["nll"], b["nll"], rel_tol=1e-5), (a["nll"], b["nll"])
    assert max_abs_diff(adapter(one), adapter(two)) <= PARAM_ATOL


@pytest.mark.parametrize("resumed", ["on_fsdp", "on_one"])
def test_checkpoints_move_between_fsdp_and_one_process(runs, resumed) -> None:
    run = runs[resumed]
    assert [r["step"] for r in train_log(run)] == [1, 2, 3, 4]
    state = json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == (2 if resumed == "on_fsdp" else 1)
    assert max_abs_diff(adapter(runs["lora1"]), adapter(run)) <= PARAM_ATOL


def test_the_check_sees_a_wrong_kl_weight(runs, assets, tmp_path) -> None:
    """The same 1-process run with the KL step doubled ends far outside the tolerance."""
    doubled = tmp_path / "doubled"
    with one_thread():
        assert main(_blob(assets, doubled, 4, "--kl-lr", "2e-8")) == 0
    assert _std_rel_diff(adapter(runs["paper1"]), adapter(doubled)) > 0.05  # measured 0.106
    shutil.rmtree(doubled)
