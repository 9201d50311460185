"""``compare --workers K``: one command, K processes sharing one experiment's runs.

Why: on a CPU, K processes with a K-th of the threads each do more work than one process with
all of them (two one-thread processes did 1.19-1.24x the training steps and 1.08-1.15x the
evaluation of one two-thread process on 2 cores, ``bench/compare_workers.py``), and the runs
of an experiment are independent. The processes share the runs through ``claims`` exactly as
separately started ``compare`` processes do; this module only starts the other K - 1, keeps
their output in log files, and makes them stop with the command:

* each worker gets ``--threads`` (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` too) and runs
  in its own session, so a Ctrl-C at the terminal reaches the command only, which then sends
  each worker one SIGTERM: a worker finishes its training step, checkpoints it and stops (an
  evaluation keeps its saved progress), as a single ``compare`` does;
* on Linux a worker also gets SIGTERM when the command dies without cleaning up (SIGKILL, a
  crash): the worker asks for it itself at its start (``die_with_parent``, ``PR_SET_PDEATHSIG``;
  in the worker, not in a ``preexec_fn``, which is unsafe in a process with threads).
  Elsewhere such a worker goes on with the experiment alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from blob_lora.utils.atomic import atomic_write_json

#: the workers' logs, under the experiment folder
WORKERS_DIR = "workers"
#: a worker's exit status when runs of its own failed (recorded in :class:`SharedFailures`,
#: so the command lists them). Not 1, which is also Python's status for an uncaught
#: exception: a worker that crashed must not pass for one whose runs failed.
RUNS_FAILED_STATUS = 3
_PR_SET_PDEATHSIG = 1


def threads_per_worker(workers: int, threads: int | None, available: int) -> int:
    """Threads for each of ``workers`` processes: ``threads`` if given, else an equal share
    of the ``available`` ones (at least one)."""
    if threads is not None:
        return threads
    return max(1, available // workers)


def worker_command(argv: list[str]) -> list[str]:
    """The command line of a worker: this interpreter running ``blob-lora`` with ``argv``."""
    return [sys.executable, "-m", "blob_lora.cli.main", *argv]


def die_with_parent(parent: int) -> bool:
    """Ask for SIGTERM when the process that started this one dies (Linux); return whether
    ``parent`` is still this process's parent (``False``: it is gone already, stop now).
    Checked before (nothing is asked of a process that is no worker) and after (the parent
    may have died in between)."""
    if os.getppid() != parent:
        return False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent


class Workers:
    """Run ``commands`` as worker processes for the duration of a ``with`` block.

    On leaving the block normally the workers are waited for (they stop when no unfinished
    run is left to them); on an exception (a signal, Ctrl-C, an error) each live worker gets
    one SIGTERM first, and a second Ctrl-C while waiting sends them SIGINT (which stops a
    worker at once, without its checkpoint; another SIGTERM would not). ``returncodes`` and
    ``logs`` say how each ended.
    """

    def __init__(self, commands: list[list[str]], threads: int, log_dir: Path) -> None:
        self.commands = commands
        self.threads = threads
        self.log_dir = Path(log_dir)
        self.logs = [self.log_dir / f"worker{k + 1}.log" for k in range(len(commands))]
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Workers:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
        }
        try:
            for cmd, log in zip(self.commands, self.logs, strict=True):
                with log.open("ab") as f:
                    self.procs.append(
                        subprocess.Popen(
                            cmd,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=f,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
        except BaseException:
            self._stop()
            self._wait()
            raise
        return self

    def _stop(self, sig: int = signal.SIGTERM) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    def _wait(self) -> None:
        for p in self.procs:
            p.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._stop()
        try:
            self._wait()
        except KeyboardInterrupt:
            self._stop(signal.SIGINT)  # Ctrl-C again: the workers stop at once, unsaved
            self._wait()
            raise

    def poll(self) -> list[int | None]:
        """Each worker's exit status, ``None`` while it runs."""
        return [p.poll() for p in self.procs]

    @property
    def returncodes(self) -> list[int | None]:
        return [p.returncode for p in self.procs]


#: runs that failed in one process of a ``--workers`` command, under the workers' folder
FAILED_DIR = "failed"


class SharedFailures:
    """The runs that failed in any process of one ``--workers`` command, one small JSON file
    each: the others then do not train a failed run again (each process used to try it once,
    K trainings of a run that diverges late), and the command's compare.json lists the
    workers' failures with their errors, not only that a worker exited non-zero. The command
    clears the folder before it starts its workers, so a later command tries them again."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _path(self, label: str) -> Path:
        return self.root / f"{hashlib.sha256(label.encode()).hexdigest()[:20]}.json"

    def add(self, label: str, error: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._path(label), {"run": label, "error": error})

    def has(self, label: str) -> bool:
        return self._path(label).is_file()

    def error(self, label: str) -> str:
        return self.all().get(label, "failed in another process")

    def all(self) -> dict[str, str]:
        """run label -> error, for every failure recorded so far."""
        found = {}
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text(encoding="utf-8"))
                found[str(record["run"])] = str(record["error"])
        return found
