"""Two CPU processes (DDP over gloo, launched by ``accelerate launch``) against one process.

With the same global batch (2 processes x batch 2 == 1 process x batch 4) the runs must see
the same examples at every step and optimise the same objective (mean NLL over the global
batch + pi * KL, pi from the global batch). What is compared:

* ``--method lora`` (deterministic): the logged global-batch NLL of every step (rel. 1e-5) and
  the final adapter (max abs difference <= 1e-6; the only difference is float summation order
  in the gradient all-reduce, measured ~5e-8);
* ``--method blob`` (weight noise differs per process, so parameters cannot match): pi of every
  step exactly, the KL cycle, and the KL per step within 1e-4 relative (measured ~1e-6; a KL
  gradient summed or averaged wrongly across processes would move it by orders more);
* evaluation on 7 examples with eval batch 2 (7 is not a multiple of 2 x 2): every example is
  scored once (n_examples, predictions.jsonl) and the LoRA metrics agree;
* a training set that is not a multiple of processes x batch (10 and 5 examples, the latter
  accumulated over micro-batches of 1): Accelerate fills the epoch's last round up with
  examples from its start, which count for nothing in the loss, so the runs still agree step
  for step with one process, which takes the short batch as it is (before, the last step's
  NLL and the adapter moved by about 2e-2);
* checkpoints are world-size independent: a 1-process checkpoint resumed on 2 processes at
  batch 2, and a 2-process checkpoint resumed on 1 process at batch 4, both end on the
  uninterrupted 1-process adapter (<= 1e-6).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blob_lora.cli.main import main
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

DRIVER = Path(__file__).with_name("launch_driver.py")
PARAM_ATOL = 1e-6


def _lora(assets, out, batch, *extra):
    return base_args(
        assets,
        out,
        "--method", "lora", "--batch-size", str(batch), "--max-steps", "4",
        "--checkpoint-every", "2", "--eval-samples", "0", "--eval-batch-size", "2", *extra,
    )  # fmt: skip


def _uneven(assets, out, n_train, batch, *extra):
    """LoRA on ``n_train`` of the 16 training examples, one epoch and a step of the next."""
    return base_args(
        assets,
        out,
        "--method", "lora", "--train-split", f"train[:{n_train}]", "--batch-size", str(batch),
        "--max-steps", "4", "--eval-samples", "0", "--eval-batch-size", "4", *extra,
    )  # fmt: skip


UNEVEN = {  # name: (n_train, batch on one process, on each of two, --grad-accum)
    "uneven10": (10, 4, 2, 1),
    "uneven5_accum": (5, 2, 1, 2),
}


def _blob(assets, out, batch):
    return base_args(
        assets,
        out,
        "--method", "blob", "--batch-size", str(batch), "--max-steps", "4",
        "--eval-samples", "2", "--eval-batch-size", "2", "--lr", "1e-3",
        "--kl-schedule", "uniform",  # pi = 1/K every step: a KL term that moves the weights
    )  # fmt: skip


def _interrupted_copy(src: Path, dst: Path) -> None:
    """``src`` as if killed after its step-2 checkpoint: no step-4 checkpoint, no results."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step-00000004")
    (dst / "checkpoints" / "latest").write_text("step-00000002\n")
    for name in ("adapter", "eval"):
        shutil.rmtree(dst / name)
    (dst / "summary.json").unlink()


def _launch_two(argvs: list[list[str]], tmp: Path) -> subprocess.CompletedProcess:
    spec = tmp / "argv.json"
    spec.write_text(json.dumps(argvs))
    env = cli_env()
    env["ACCELERATE_USE_CPU"] = "1"  # without it torchrun's processes on a CPU machine run alone
    env["HF_HOME"] = str(tmp / "hf-home")  # ignore any personal accelerate default_config.yaml
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
        "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(DRIVER), str(spec),
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    r = {k: tmp / k for k in ("lora1", "blob1", "lora2", "blob2", "resume_on2", "resume_on1")}
    uneven = {}
    for name, (n_train, one, two, accum) in UNEVEN.items():
        for world, batch in ((1, one), (2, two)):
            r[f"{name}_{world}"] = tmp / f"{name}_{world}"
            uneven[world] = [
                *uneven.get(world, []),
                _uneven(assets, r[f"{name}_{world}"], n_train, batch, "--grad-accum", str(accum)),
            ]
    r["bucketed11_2"] = tmp / "bucketed11_2"
    uneven[2].append(_uneven(assets, r["bucketed11_2"], 11, 2, "--bucket-by-length"))
    with one_thread():
        assert main(_lora(assets, r["lora1"], 4)) == 0
        assert main(_blob(assets, r["blob1"], 4)) == 0
        for argv in uneven[1]:
            assert main(argv) == 0
    _interrupted_copy(r["lora1"], r["resume_on2"])
    proc = _launch_two(
        [
            _lora(assets, r["lora2"], 2),
            _blob(assets, r["blob2"], 2),
            _lora(assets, r["resume_on2"], 2, "--resume"),
            *uneven[2],
        ],
        tmp,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _interrupted_copy(r["lora2"], r["resume_on1"])
    with one_thread():
        assert main(_lora(assets, r["resume_on1"], 4, "--resume")) == 0
    return r


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_lora_two_processes_equal_one_process(runs) -> None:
    one, two = runs["lora1"], runs["lora2"]
    assert _summary(one)["world_size"] == 1 and _summary(two)["world_size"] == 2
    log1, log2 = train_log(one), train_log(two)
    assert [r["step"] for r in log2] == [1, 2, 3, 4]
    for a, b in zip(log1, log2, strict=True):
        # the same 4 examples per step: the global-batch NLL agrees to float rounding
        assert math.isclose(a["nll"], b["nll"], rel_tol=1e-5), (a, b)
        assert a["acc"] == b["acc"] and a["lr"] == b["lr"] and a["pi"] == b["pi"] == 0.0
    assert max_abs_diff(adapter(one), adapter(two)) <= PARAM_ATOL


@pytest.mark.parametrize("name", list(UNEVEN))
def test_an_uneven_training_set_trains_as_on_one_process(runs, name) -> None:
    one, two = runs[f"{name}_1"], runs[f"{name}_2"]
    assert _summary(two)["world_size"] == 2
    log1, log2 = train_log(one), train_log(two)
    assert [r["step"] for r in log2] == [1, 2, 3, 4]
    assert _summary(one)["steps_per_epoch"] < 4  # the epoch's short last step is among them
    for a, b in zip(log1, log2, strict=True):
        assert math.isclose(a["nll"], b["nll"], rel_tol=1e-5), (a, b)
        assert a["acc"] == b["acc"]
    assert max_abs_diff(adapter(one), adapter(two)) <= PARAM_ATOL


def test_length_buckets_on_two_processes_keep_every_batch_of_the_epoch(runs) -> None:
    """11 examples in buckets of 2 per process: 6 batches, 3 steps an epoch. Where the short
    batch was shuffled into a round's first place, Accelerate dropped that round, and the
    epoch ended a step early."""
    run = runs["bucketed11_2"]
    assert _summary(run)["steps_per_epoch"] == 3
    assert [r["epoch"] for r in train_log(run)] == [0, 0, 0, 1]


def test_uneven_evaluation_counts_every_example_once(runs) -> None:
    m1 = _summary(runs["lora1"])["evaluations"]
    m2 = _summary(runs["lora2"])["evaluations"]
    (task,) = m1
    assert m1[task]["n_examples"] == m2[task]["n_examples"] == N_EVAL
    assert m1[task]["accuracy"] == m2[task]["accuracy"]
    assert math.isclose(m1[task]["nll"], m2[task]["nll"], rel_tol=1e-5)
    for run in (runs["lora2"], runs["blob2"]):
        eval_dir = next((run / "eval").iterdir())
        rows = [json.loads(x) for x in (eval_dir / "predictions.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(f"q{100 + i}" for i in range(N_EVAL))
        assert json.loads((eval_dir / "metrics.json").read_text())["n_examples"] == N_EVAL


def test_blob_kl_weight_and_cycle_follow_the_global_batch(runs) -> None:
    s1, s2 = _summary(runs["blob1"]), _summary(runs["blob2"])
    assert s1["kl_cycle"] == s2["kl_cycle"] and s1["steps_per_epoch"] == s2["steps_per_epoch"]
    log1, log2 = train_log(runs["blob1"]), train_log(runs["blob2"])
    assert [r["pi"] for r in log1] == [r["pi"] for r in log2]
    assert all(r["pi"] > 0 for r in log2)
    for a, b in zip(log1, log2, strict=True):
        assert math.isclose(a["kl"], b["kl"], rel_tol=1e-4), (a["kl"], b["kl"])
    assert log2[-1]["kl"] < log2[0]["kl"] - 1.0  # the KL term does pull the weights
    (task,) = s2["evaluations"]
    assert s2["evaluations"][task]["n_examples"] == N_EVAL
    assert s2["evaluations"][task]["eval_samples"] == 2


@pytest.mark.parametrize("resumed", ["resume_on2", "resume_on1"])
def test_checkpoints_resume_on_another_world_size(runs, resumed) -> None:
    run = runs[resumed]
    assert [r["step"] for r in train_log(run)] == [1, 2, 3, 4]
    state = json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == (2 if resumed == "resume_on2" else 1)
    assert state["global_batch"] == 4
    assert max_abs_diff(adapter(runs["lora1"]), adapter(run)) <= PARAM_ATOL


def test_other_global_batch_is_refused_on_resume(runs, tmp_path, assets, capsys) -> None:
    run = tmp_path / "r"
    _interrupted_copy(runs["lora1"], run)
    assert main(_lora(assets, run, 2, "--resume")) == 2  # 1 process x 2 != 4
    err = capsys.readouterr().err
    assert "global batch of 4" in err and "choose --batch-size" in err
    assert not (run / "adapter").exists()


def test_environment_variable_guard(tmp_path, assets, capsys, monkeypatch) -> None:
    """WORLD_SIZE=2 with a single Accelerate process (a CPU launch without ACCELERATE_USE_CPU)
    would train two independent copies into one folder: refused before anything is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    assert main(_lora(assets, out, 2)) == 2
    assert "ACCELERATE_USE_CPU=1" in capsys.readouterr().err
    assert not out.exists()
    assert os.environ["WORLD_SIZE"] == "2"
