"""A signal that reaches only one of two DDP processes stops both after the same step, with
one checkpoint written: the stop is decided collectively, so no process is left waiting in an
all-reduce that the other never joins. Slow: one extra two-process launch (~30 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blob_lora.training import checkpoint as ckpt
from tests.faults.tiny_run import base_args, cli_env, free_port, train_log

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            out += [int(c) for c in children]
            todo += [int(c) for c in children]
    return out


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"blob_lora.cli.main" not in cmd:
        return None
    ranks = [e[5:].decode() for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigterm_to_one_rank_stops_both_at_the_same_step(assets, tmp_path) -> None:
    run = tmp_path / "run"
    args = base_args(assets, run, "--method", "lora", "--batch-size", "2", "--max-steps", "400")
    env = cli_env()
    env.update(ACCELERATE_USE_CPU="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
        "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "blob_lora.cli.main", *args,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (log.is_file() and log.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.01)
        ranks = {_rank_of(p): p for p in _descendants(proc.pid)}
        os.kill(ranks["1"], signal.SIGTERM)  # rank 1 only; rank 0 writes the checkpoint
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    last = train_log(run)[-1]["step"]
    assert 2 <= last < 400
    stops = [x for x in err.splitlines() if "blob-lora train: error: stopped by" in x]
    assert len(stops) == 2, err[-3000:]  # both ranks stop, after the same step
    assert all(f"after step {last}; checkpoint saved" in x for x in stops)
    assert any("signal 15" in x for x in stops) and any("a signal" in x for x in stops)
    saved = ckpt.latest_checkpoint(run / "checkpoints")
    assert saved.name == f"step-{last:08d}"
    state = json.loads((saved / "state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 4
    assert len(ckpt.load_checkpoint(saved)["rng"]) == 2  # the RNG state of each rank
