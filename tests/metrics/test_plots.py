"""Plots are real PNGs, written atomically, and leave no pyplot figures or stray files."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from blob_lora.metrics import (
    ood_roc_plot,
    reliability_diagram,
    reliability_diagram_multi,
    risk_coverage_plot,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(seed: int, n: int = 60, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(n, c, generator=g), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


def _assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    # Only the target file: no temporary siblings left behind.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def _render_all(tmp_path: Path) -> list[Path]:
    probs, labels = _data(0)
    probs2, labels2 = _data(1)
    conf, pred = probs.max(1)
    conf2, pred2 = probs2.max(1)
    out = []
    out.append(reliability_diagram(probs, labels, tmp_path / "a" / "rel.png", title="test"))
    out.append(
        reliability_diagram_multi(
            {"map": (probs, labels), "blob": (probs2, labels2)}, tmp_path / "b" / "m.png", "cmp"
        )
    )
    out.append(
        risk_coverage_plot(
            {"map": (conf, pred == labels), "blob": (conf2, pred2 == labels2)},
            tmp_path / "c" / "rc.png",
        )
    )
    out.append(
        ood_roc_plot(
            {"entropy": (torch.rand(30), torch.rand(20) + 0.3), "mi": ([0.1, 0.2], [0.3, 0.05])},
            tmp_path / "d" / "roc.png",
        )
    )
    return out


def test_all_plots_write_pngs_without_leaking_figures(tmp_path: Path) -> None:
    before = plt.get_fignums()
    paths = _render_all(tmp_path)
    assert [p.parent.name for p in paths] == ["a", "b", "c", "d"]
    for p in paths:
        _assert_png(p)
    assert plt.get_fignums() == before


def test_reliability_diagram_handles_confidence_one_and_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "rel.png"
    target.write_bytes(b"old")
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.4]])
    reliability_diagram(probs, torch.tensor([0, 0, 1]), target)
    _assert_png(target)


def test_invalid_input_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        reliability_diagram(torch.tensor([[0.9, 0.9]]), torch.tensor([0]), tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one"):
        reliability_diagram_multi({}, tmp_path / "y.png", "t")
    with pytest.raises(ValueError, match="has 1 entries"):
        risk_coverage_plot({"a": ([0.5, 0.6], [1])}, tmp_path / "z.png")
    with pytest.raises(ValueError, match="empty"):
        ood_roc_plot({"a": ([], [0.5])}, tmp_path / "w.png")
    assert list(tmp_path.iterdir()) == []


def test_render_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "rel.png"
    target.write_bytes(b"old")

    def boom(self, *args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(Figure, "savefig", boom)
    probs, labels = _data(0)
    with pytest.raises(RuntimeError, match="render failed"):
        reliability_diagram(probs, labels, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["rel.png"]


def test_write_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("blob_lora.utils.atomic.os.replace", failing_replace)
    probs, labels = _data(0)
    with pytest.raises(OSError, match="disk full"):
        reliability_diagram(probs, labels, tmp_path / "rel.png")
    assert list(tmp_path.iterdir()) == []
