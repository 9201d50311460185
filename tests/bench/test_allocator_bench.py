"""bench/allocator.py: a child's own resource usage is read, each mode's environment reaches
it (and only it), and keeping freed blocks does spare the page faults the bench reports."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import load_script

#: fills a fresh 64 MiB block 8 times: glibc maps and unmaps each one by default
FILL = "for _ in range(8):\n    b = b'\\x01' * (64 << 20)\n"


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/allocator.py", "bench_allocator")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's settings")
def test_kept_blocks_spare_the_faults_of_refilling_them(bench, monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "7")  # the caller's own setting must not leak in
    default = bench.measured([sys.executable, "-c", FILL], bench.MODES["glibc default"])
    kept = bench.measured([sys.executable, "-c", FILL], bench.MODES["kept (mmap off)"])
    pages = 8 * (64 << 20) // 4096
    assert default["minor_faults"] > 0.9 * pages  # every fill faults its pages in anew
    # the block is reused: faulted in once (1/8 of the pages), plus Python's own start-up
    assert kept["minor_faults"] < 0.35 * pages
    assert kept["minor_faults"] < default["minor_faults"] / 3
    for r in (default, kept):
        assert r["cpu_s"] == pytest.approx(r["user_s"] + r["sys_s"])
        assert 64 < r["peak_rss_mib"] < 1024 and r["wall_s"] > 0


def test_each_mode_environment_reaches_the_child(bench, monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "5")  # the caller's: would exit 5 if it leaked
    show = "import os, sys\nsys.exit(int(os.environ.get('MALLOC_MMAP_MAX_', '9')))"
    assert bench.MODES["kept (mmap off)"]["MALLOC_MMAP_MAX_"] == "0"
    bench.measured([sys.executable, "-c", show], bench.MODES["kept (mmap off)"])  # exit 0
    with pytest.raises(SystemExit, match=r"failed \(9\)"):  # nothing set: the default 9
        bench.measured([sys.executable, "-c", show], bench.MODES["glibc default"])


def test_a_child_writing_more_than_a_pipe_holds_is_still_measured(bench) -> None:
    """1 MiB on stderr (a pipe holds 64 KiB) and a failing exit: read back, no deadlock."""
    loud = "import sys\nsys.stderr.write('x' * (1 << 20) + 'END')\nsys.exit(3)"
    with pytest.raises(SystemExit, match=r"failed \(3\):\n.*END$"):
        bench.measured([sys.executable, "-c", loud], {})
