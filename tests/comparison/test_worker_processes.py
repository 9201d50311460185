"""``compare --workers``: the worker processes' threads, logs, and how they stop with the
command (one SIGTERM each when it leaves with an error; on Linux also when it is killed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from blob_lora.cli.main import main
from blob_lora.comparison.workers import Workers, threads_per_worker

REPO = Path(__file__).resolve().parents[2]
# the module alone (it needs only the standard library): importing the package would load
# torch and transformers in both processes, which takes a minute on a busy 2-core machine
LOAD_WORKERS = f"""
import importlib.util
_spec = importlib.util.spec_from_file_location(
    "workers", {str(REPO / "src/blob_lora/comparison/workers.py")!r}
)
workers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(workers)
"""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def wait_for(path: Path, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.is_file() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_threads_per_worker():
    assert threads_per_worker(2, None, 2) == 1
    assert threads_per_worker(3, None, 16) == 5
    assert threads_per_worker(4, None, 2) == 1  # never zero
    assert threads_per_worker(2, 3, 16) == 3  # asked for


def test_workers_get_their_threads_own_sessions_and_logs(tmp_path):
    code = """
        import os, sys
        print("threads", os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"])
        print("own session", os.getsid(0) == os.getpid())
        sys.exit(int(sys.argv[1]))
    """
    with Workers([python(code) + ["0"], python(code) + ["3"]], 2, tmp_path / "w") as workers:
        assert len(workers.poll()) == 2
    assert workers.returncodes == [0, 3]
    assert [p.name for p in workers.logs] == ["worker1.log", "worker2.log"]
    for log in workers.logs:
        assert log.read_text().splitlines() == ["threads 2 2", "own session True"]


def test_an_error_in_the_command_sends_each_worker_one_sigterm(tmp_path):
    code = """
        import signal, sys, time
        got = []
        signal.signal(signal.SIGTERM, lambda *a: got.append(1))
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a second SIGTERM would be counted here
        print("sigterms", len(got), flush=True)
        sys.exit(0 if got else 1)
    """
    workers = Workers([python(code), python(code)], 1, tmp_path / "w")
    with pytest.raises(RuntimeError, match="the command failed"), workers:
        for log in workers.logs:
            wait_for(log, "ready")
        raise RuntimeError("the command failed")
    assert workers.returncodes == [0, 0]  # they stopped on their own, after the signal
    assert all("sigterms 1" in log.read_text() for log in workers.logs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_stops_when_its_command_is_killed(tmp_path):
    child = LOAD_WORKERS + textwrap.dedent("""
        import os, sys, time
        assert workers.die_with_parent(int(sys.argv[1]))
        print("ready", os.getpid(), flush=True)
        time.sleep(120)
    """)
    parent = LOAD_WORKERS + textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        cmd = [sys.executable, "-c", {child!r}, str(os.getpid())]
        with workers.Workers([cmd], 1, Path({str(tmp_path / "w")!r})):
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        text = wait_for(tmp_path / "w" / "worker1.log", "ready")
        pid = int(text.split()[1])
        proc.kill()  # no cleanup in the command: only the kernel can tell the worker
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie nobody reaps has stopped all the same


def test_compare_refuses_bad_worker_and_thread_counts(capsys):
    assert main(["compare", "--config", "x.yaml", "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert main(["compare", "--config", "x.yaml", "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_a_worker_whose_command_is_gone_stops_at_once(tmp_path):
    # --worker-of names a process that is not this one's parent: nothing is run. Its own pid,
    # never its parent (pid 1 is the parent of a test run whose starting shell has exited)
    not_parent = str(os.getpid())
    code = main(["compare", "--config", str(tmp_path / "missing.yaml"), "--worker-of", not_parent])
    assert code == 0


def test_a_crashed_worker_is_reported_not_taken_for_failed_runs(tmp_path, monkeypatch):
    """A worker whose runs failed exits with ``RUNS_FAILED_STATUS`` (its failures are in the
    shared board, which the command lists); any other status, 1 included (Python's for an
    uncaught exception: a CUDA out-of-memory error, say), is a crash the command reports."""
    import argparse

    from blob_lora.cli.commands import compare as command
    from blob_lora.comparison import spec_from_dict
    from blob_lora.comparison import workers as workers_mod

    spec = spec_from_dict({"methods": ["lora"], "tasks": ["arc_easy"]}, "x", out=tmp_path / "o")

    class Finished:  # the workers as they are once the command's own runs are done
        def __init__(self, commands, threads, folder):
            self.logs = [folder / f"worker{i + 1}.log" for i in range(len(commands))]
            self.returncodes = [workers_mod.RUNS_FAILED_STATUS, 1]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def poll(self):
            return self.returncodes

    monkeypatch.setattr(workers_mod, "Workers", Finished)
    monkeypatch.setattr("blob_lora.comparison.run_compare", lambda *a, **k: {"failed": []})
    args = argparse.Namespace(config="x.yaml", out=None, data_root=None, workers=3,
                              no_progress=True)  # fmt: skip
    result = command._run_with_workers(args, spec, 1)
    assert result["failed"] == [
        f"a worker exited with status 1: see {spec.out}/workers/worker2.log"
    ]


def test_a_worker_whose_run_failed_exits_with_the_failed_runs_status(tmp_path, data_root):
    from blob_lora.comparison.workers import RUNS_FAILED_STATUS
    from tests.factories import tiny_compare_experiment, tiny_model_folder

    exp = tiny_compare_experiment(tiny_model_folder(tmp_path / "model"), ["lora"])
    exp["train"]["target_modules"] = ["no_such_module"]  # refused when the adapter is built
    config = tmp_path / "bad.yaml"
    config.write_text(__import__("yaml").safe_dump(exp))
    cmd = [sys.executable, "-m", "blob_lora.cli.main", "compare", "--config", str(config)]
    cmd += ["--out", str(tmp_path / "out"), "--no-progress", "--data-root", str(data_root)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    worker = subprocess.run(
        [*cmd, "--worker-of", str(os.getpid())], env=env, capture_output=True, text=True
    )
    assert worker.returncode == RUNS_FAILED_STATUS, worker.stderr[-2000:]
    assert "failed: winogrande_s/lora/seed1" in worker.stdout
    alone = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert alone.returncode == 1, alone.stderr[-2000:]
