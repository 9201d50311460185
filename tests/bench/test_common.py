"""bench/common.py: a report names a path by where it lies inside its checkout, never by a
folder of the machine it ran on."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[2]


def test_checkout_relative_names_no_folder_of_the_machine(tmp_path: Path) -> None:
    common = load_script("bench/common.py", "bench_common")
    inside = ROOT / "paper" / "out" / "regime_tables" / "runs" / "x" / "adapter"
    assert common.checkout_relative(inside) == "paper/out/regime_tables/runs/x/adapter"
    other = tmp_path / "exp"  # another checkout (a worktree of the experiment)
    (other / ".git").mkdir(parents=True)
    run = other / "paper" / "out" / "adapter"
    assert common.checkout_relative(run) == "paper/out/adapter"
    assert common.checkout_relative(tmp_path / "loose" / "adapter") == "adapter"
