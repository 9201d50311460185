"""A ``blob-lora train`` process killed with SIGKILL at a random step resumes to exactly the
adapter of an uninterrupted run (bitwise, on CPU: the checkpoint holds the weights, the
optimiser and scheduler states, the data position and every RNG state of the BLoB noise)."""

from __future__ import annotations

import json
import random
import shutil
import signal

import pytest
import torch

from blob_lora.cli.main import main
from blob_lora.training import checkpoint as ckpt
from tests.faults.tiny_run import (
    adapter,
    base_args,
    latest_step,
    one_thread,
    signal_after_checkpoint,
    train_log,
)

STEPS = 40


def _args(assets, out, *extra):
    return base_args(
        assets,
        out,
        "--method", "blob", "--batch-size", "3", "--max-steps", str(STEPS),
        "--checkpoint-every", "1", "--evaluate", "false", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def full(assets, tmp_path_factory):
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("full") / "run"
    with one_thread():  # the CLI subprocesses run on one thread too: same float results
        assert main(_args(assets, run)) == 0
    return run


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(assets, full, tmp_path) -> None:
    reference = adapter(full)

    kill_after = random.Random().randint(1, STEPS // 2)  # the checkpoint we wait for
    run = tmp_path / "killed"
    returncode, err = signal_after_checkpoint(_args(assets, run), run, kill_after, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, f"finished before the kill: {err[-2000:]}"
    assert not (run / "adapter").exists()
    killed_at = latest_step(run)
    assert kill_after <= killed_at < STEPS
    assert ckpt.latest_checkpoint(run / "checkpoints") is not None

    with one_thread():
        assert main([*_args(assets, run), "--resume"]) == 0
    resumed = adapter(run)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), (name, kill_after, killed_at)
    assert [r["step"] for r in train_log(run)] == list(range(1, STEPS + 1))
    full_log = train_log(full)
    assert [r["nll"] for r in train_log(run)] == [r["nll"] for r in full_log]
    # no temporary checkpoint folders are left behind by the write the kill interrupted
    assert not list((run / "checkpoints").glob(".step-*"))


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_afresh(assets, tmp_path) -> None:
    with one_thread():
        assert main(_args(assets, tmp_path / "full")) == 0
        run = tmp_path / "early"
        shutil.copytree(tmp_path / "full", run)
        for name in ("checkpoints", "adapter"):
            shutil.rmtree(run / name)
        assert main([*_args(assets, run), "--resume"]) == 0
    for name, value in adapter(tmp_path / "full").items():
        assert torch.equal(adapter(run)[name], value), name


#: LoRA on the top block only: block 0's output then comes from the frozen-prefix cache
TOP_BLOCK = r".*layers\.1\.self_attn\.(q_proj|v_proj)"


def test_resume_through_the_prefix_cache_is_bitwise_identical(assets, tmp_path) -> None:
    """With the lower block frozen, its output for each example is computed once, in the
    batch (and ``--length-chunks`` chunk) where the run first meets the example, and carries
    that batch's padding in its last bits. A run killed in its first epoch, resumed, killed in
    a later one and resumed again still ends with the uninterrupted run's adapter, bit for bit
    (before the resumed run computed the features it had lost in other batches: 1e-7 off)."""
    steps = 24  # 16 examples in batches of 3: 6 micro-batches an epoch, 4 epochs

    def args(out, *extra):
        return base_args(
            assets, out, "--method", "blob", "--batch-size", "3", "--max-steps", str(steps),
            "--checkpoint-every", "1", "--evaluate", "false", "--length-chunks", "2",
            "--target-modules", TOP_BLOCK, *extra,
        )  # fmt: skip

    full = tmp_path / "full"
    with one_thread():
        assert main(args(full)) == 0
    assert json.loads((full / "summary.json").read_text())["prefix_cached_blocks"] == 1
    run = tmp_path / "killed"
    killed_at = []
    for kill_after, extra in ((2, ()), (14, ("--resume",))):
        code, err = signal_after_checkpoint(args(run, *extra), run, kill_after, signal.SIGKILL)
        assert code == -signal.SIGKILL, f"finished before the kill: {err[-2000:]}"
        killed_at.append(latest_step(run))
    assert killed_at[0] < killed_at[1] < steps
    with one_thread():
        assert main(args(run, "--resume")) == 0
    reference, resumed = adapter(full), adapter(run)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), (name, killed_at)
    assert [r["nll"] for r in train_log(run)] == [r["nll"] for r in train_log(full)]
