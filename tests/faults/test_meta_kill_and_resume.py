"""A ``blob-lora meta-train`` process killed with SIGKILL at a random meta-step resumes with
``--resume`` to exactly the uninterrupted run (bitwise, on CPU: the checkpoint holds the global
parameters, AdamW's state, every RNG state and the log; the task, question and weight-sample
draws are functions of the seed and the step)."""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from blob_lora.cli.main import main
from blob_lora.training import checkpoint as ckpt
from tests.factories import tiny_model_folder, tiny_task_collection
from tests.faults.tiny_run import latest_step, one_thread, signal_after_checkpoint
from tests.pipeline.test_meta import train_args

STEPS = 30


def _args(tasks, model, out, *extra):
    base = train_args(tasks, model, out, "--lora-dropout", "0.2", "--checkpoint-every", "1")
    base[base.index("--meta-steps") + 1] = str(STEPS)
    return [*base, *extra]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta-kill")
    model = tiny_model_folder(root / "model")
    tasks = tiny_task_collection(root / "tasks", n_tasks=4, n_questions=10)
    full = root / "full"
    with one_thread():  # the CLI subprocess runs on one thread too: the same float results
        assert main(_args(tasks, model, full)) == 0
    return tasks, model, full


def test_sigkill_at_a_random_meta_step_then_resume_is_bitwise_identical(inputs, tmp_path):
    tasks, model, full = inputs
    kill_after = random.Random().randint(1, STEPS // 2)  # the checkpoint we wait for
    run = tmp_path / "killed"
    returncode, err = signal_after_checkpoint(
        _args(tasks, model, run), run, kill_after, signal.SIGKILL
    )
    assert returncode == -signal.SIGKILL, f"finished before the kill: {err[-2000:]}"
    assert not (run / "tasks.json").exists() and not (run / "adapter").exists()
    killed_at = latest_step(run)
    assert kill_after <= killed_at < STEPS
    assert ckpt.latest_checkpoint(run / "checkpoints") is not None

    with one_thread():
        assert main(_args(tasks, model, run, "--resume")) == 0
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    want = load_file(full / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), (name, kill_after, killed_at)
    for name in ("meta_train_log.jsonl", "meta_config.json"):
        assert (run / name).read_text() == (full / name).read_text(), name
    got_tasks, want_tasks = (json.loads((r / "tasks.json").read_text()) for r in (run, full))
    assert got_tasks.pop("train_seconds") > 0 and want_tasks.pop("train_seconds") > 0
    assert got_tasks == want_tasks  # all but the wall time
    assert not (run / "checkpoints").exists()  # a finished run keeps none
    assert not list(run.glob(".*"))  # nor any temporary left by the write the kill cut


def test_sigterm_checkpoints_the_step_in_flight_and_resume_is_bitwise_identical(inputs, tmp_path):
    """A scheduler's SIGTERM (a session's end) loses nothing: the step in flight finishes, is
    checkpointed, the command exits with a clear error, and --resume ends at the
    uninterrupted run."""
    tasks, model, full = inputs
    run = tmp_path / "terminated"
    args = _args(tasks, model, run)
    args[args.index("--checkpoint-every") + 1] = "5"
    returncode, err = signal_after_checkpoint(args, run, 5, signal.SIGTERM)  # inside the steps
    assert returncode == 2, err[-2000:]
    assert "stopped by signal 15 after step" in err and "continue with --resume" in err
    stopped_at = latest_step(run)
    assert f"after step {stopped_at};" in err  # the signal's own checkpoint is the newest
    assert 5 <= stopped_at < STEPS
    assert not (run / "tasks.json").exists()

    with one_thread():
        assert main([*args, "--resume"]) == 0
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    want = load_file(full / "adapter" / "adapter_model.safetensors")
    for name in want:
        assert torch.equal(got[name], want[name]), (name, stopped_at)
    assert (run / "meta_train_log.jsonl").read_text() == (full / "meta_train_log.jsonl").read_text()
