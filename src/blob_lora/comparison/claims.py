"""Run claims: several ``blob-lora compare`` processes share out one experiment's runs.

Why: one process leaves capacity idle wherever one run cannot use the whole machine (one
process per GPU on a multi-GPU node; on a small CPU, two one-thread processes do 1.1-1.3x the
work of one two-thread process, ``bench/compare_workers.py``). Each process claims a run before
it trains or evaluates it, and takes the first run no other process holds.

A claim is an exclusive ``flock`` (through ``filelock``) on ``DIR/.claims/<run>.lock``, held
while the process works on the run. The operating system drops it when the process dies, so a
killed process leaves no stale claim: the next process resumes the run from its checkpoint.
The lock files live outside the run folders, which stay exactly as ``train`` writes them.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from blob_lora.tasks.dir_names import FILE_LIMIT, fit_name

CLAIMS_DIR = ".claims"


class RunClaims:
    """Claims on the runs of one experiment folder (``DIR`` of ``compare``)."""

    def __init__(self, out: Path) -> None:
        self.dir = Path(out) / CLAIMS_DIR

    def _lock(self, label: str) -> FileLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        # thread_local=False: a claim is the process's, whichever thread releases it
        # the label holds the task's name, a folder's whole path for one's own data
        name = fit_name(label.replace("/", "__"), FILE_LIMIT)
        return FileLock(self.dir / f"{name}.lock", thread_local=False)

    def take(self, label: str) -> FileLock | None:
        """Claim run ``label`` now, or ``None`` when another holder has it. Release the
        returned lock (``lock.release()`` or ``with lock:``) when done with the run."""
        lock = self._lock(label)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return lock

    def held(self, label: str) -> bool:
        """Whether some holder (another process, or another claim of this one) has ``label``."""
        lock = self.take(label)
        if lock is None:
            return True
        lock.release()
        return False
