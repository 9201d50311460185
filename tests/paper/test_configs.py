"""Every experiment file in ``paper/`` still loads: a new option, a renamed setting or a
method's changed defaults must not leave the reproduction's configs unreadable."""

from __future__ import annotations

from pathlib import Path

import pytest

from blob_lora.comparison import load_spec

PAPER = Path(__file__).resolve().parents[2] / "paper"
#: abmll_tables.yaml is a meta-learning plan (paper/abmll_tables.py, tested beside it)
NOT_SPECS = ("paper_reference.yaml", "abmll_tables.yaml")
SPECS = sorted(p for p in PAPER.glob("*.yaml") if p.name not in NOT_SPECS)


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_experiment_file_loads(path: Path) -> None:
    spec = load_spec(path)
    assert spec.methods and spec.train_tasks
    assert str(spec.out).startswith("paper/out/")  # outputs stay in the git-ignored folder


def test_cloze_tables_compare_blob_recipes_side_by_side() -> None:
    spec = load_spec(PAPER / "cloze_tables.yaml")
    paper = spec.run_settings("arc_easy", "blob", 1, Path("d"))
    strong = spec.run_settings("arc_easy", "blob-no-rescale", 1, Path("d"))
    assert paper["kl_rescale"] is True and strong["kl_rescale"] is False
    assert strong["method"] == "blob" and strong["recipe"] == "no-rescale"
    assert spec.run_order[:3] == [(1, "lora"), (1, "blob"), (1, "blob-no-rescale")]
