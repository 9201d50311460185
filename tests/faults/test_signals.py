"""SIGTERM/SIGINT stop a ``blob-lora train`` process after the current step with a checkpoint,
one clear line and exit status 2; ``--resume`` then ends on the uninterrupted adapter."""

from __future__ import annotations

import signal

import pytest
import torch

from blob_lora.cli.main import main
from blob_lora.training import checkpoint as ckpt
from tests.faults.tiny_run import adapter, base_args, one_thread, signal_when, train_log

STEPS = 60


def _args(assets, out, *extra):
    return base_args(
        assets,
        out,
        "--method", "blob", "--batch-size", "3", "--max-steps", str(STEPS),
        "--evaluate", "false", *extra,
    )  # fmt: skip


def _interrupt(assets, run, sig) -> tuple[int, str]:
    """Signal a training run once it has logged two steps."""
    log = run / "train_log.jsonl"

    def two_steps_logged() -> bool:
        return log.is_file() and log.read_text().count("\n") >= 2

    return signal_when(_args(assets, run), two_steps_logged, sig)


def test_sigterm_saves_a_checkpoint_and_resume_completes_the_run(assets, tmp_path) -> None:
    run = tmp_path / "run"
    rc, err = _interrupt(assets, run, signal.SIGTERM)
    assert rc == 2, err[-2000:]
    last = train_log(run)[-1]["step"]
    assert 2 <= last < STEPS
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"blob-lora train: error: stopped by signal {int(signal.SIGTERM)} ")
    assert f"after step {last}; checkpoint saved" in line and "--resume" in line
    saved = ckpt.latest_checkpoint(run / "checkpoints")
    assert saved.name == f"step-{last:08d}"
    assert ckpt.load_checkpoint(saved)["state"]["step"] == last
    assert not (run / "adapter").exists()

    with one_thread():
        assert main([*_args(assets, run), "--resume"]) == 0
        assert main(_args(assets, tmp_path / "full")) == 0
    for name, value in adapter(tmp_path / "full").items():
        assert torch.equal(adapter(run)[name], value), name
    assert [r["step"] for r in train_log(run)] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_sigint_saves_a_checkpoint_too(assets, tmp_path, sig) -> None:
    run = tmp_path / "run"
    rc, err = _interrupt(assets, run, sig)
    assert rc == 2, err[-2000:]
    last = train_log(run)[-1]["step"]
    assert f"stopped by signal {int(sig)} after step {last}" in err
    assert ckpt.latest_checkpoint(run / "checkpoints").name == f"step-{last:08d}"
    assert "Traceback" not in err


def test_another_sigterm_changes_nothing_and_a_second_sigint_stops_at_once() -> None:
    """``pkill -f`` reaching a ``compare --workers`` worker directly and through its command
    delivers SIGTERM twice: still one request (the step finishes and is checkpointed). Ctrl-C
    after a first signal stops at once."""
    import os
    import time

    from blob_lora.training.signals import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)  # the forwarded copy, moments later
        time.sleep(0.1)  # a handler raising would raise here
        assert stop.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back
