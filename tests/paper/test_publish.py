"""paper/publish.py copies finished runs into git; re-publishing unchanged runs must not
rewrite their files, or every sitting commits ~60 spurious binary changes."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import pytest

from summary import read_reference
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[2]


def _publish_module():
    return load_script("paper/publish.py", "publish")


def test_republishing_a_run_is_byte_identical(tmp_path: Path) -> None:
    publish = _publish_module()
    run = tmp_path / "run"
    (run / "eval" / "boolq").mkdir(parents=True)
    (run / "eval" / "boolq" / "metrics.json").write_text('{"acc": 0.5}')
    rows = b'{"id": "a", "probs": [0.2, 0.8]}\n'
    (run / "eval" / "boolq" / "predictions.jsonl").write_bytes(rows)

    gz = tmp_path / "out" / "eval" / "boolq" / "predictions.jsonl.gz"
    publish.copy_run(run, tmp_path / "out")
    first = gz.read_bytes()
    time.sleep(1.1)  # gzip headers carry whole seconds
    publish.copy_run(run, tmp_path / "out")

    assert gz.read_bytes() == first
    assert gzip.decompress(first) == rows


def test_reference_figures_are_read_or_refused_with_the_path(tmp_path: Path) -> None:
    shipped = read_reference(ROOT / "paper" / "paper_reference.yaml")
    assert shipped["paper BLoB (LLaMA-2-7B)"]["boolq"] == "86.6 / 1.5 / 0.31"
    assert len(shipped["paper MAP (LLaMA-2-7B)"]) == 6

    bad = tmp_path / "ref.yaml"
    bad.write_text("- just a list\n")
    with pytest.raises(SystemExit, match="ref.yaml: expected"):
        read_reference(bad)
    with pytest.raises(SystemExit, match="missing.yaml: cannot read"):
        read_reference(tmp_path / "missing.yaml")


def test_only_finished_runs_are_published() -> None:
    publish = _publish_module()
    compare = {
        "runs": [
            {"dir": "runs/a/lora/seed1", "status": "done"},
            {"dir": "runs/a/ensemble/seed1", "status": "train"},
            {"dir": "runs/b/blob/seed1", "status": "failed"},
        ]
    }
    assert [r["dir"] for r in publish.finished_runs(compare)] == ["runs/a/lora/seed1"]


def test_provenance_never_names_an_absolute_path_of_the_machine(tmp_path: Path) -> None:
    """Publishing from another worktree into this checkout (an absolute destination) still
    writes the repository-relative path; a relative path is kept as given."""
    publish = _publish_module()
    assert publish.shown(ROOT / "results" / "regime_tables") == "results/regime_tables"
    assert publish.shown(Path("paper/regime_tables.yaml")) == "paper/regime_tables.yaml"
    assert publish.shown(tmp_path / "elsewhere" / "table") == "table"


def test_a_new_publication_rebuilds_the_folder_but_keeps_its_hand_written_readme(
    tmp_path: Path,
) -> None:
    publish = _publish_module()
    dest = tmp_path / "table"
    (dest / "runs" / "withdrawn").mkdir(parents=True)
    (dest / "runs" / "withdrawn" / "summary.json").write_text("{}")
    (dest / "SUMMARY.md").write_text("old")
    (dest / "README.md").write_text("the reading, by hand\n")
    publish.fresh_destination(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["README.md"]
    assert (dest / "README.md").read_text() == "the reading, by hand\n"
    publish.fresh_destination(tmp_path / "new")  # a first publication: nothing to keep
    assert list((tmp_path / "new").iterdir()) == []
