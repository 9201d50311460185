"""paper/std_report.py reads the std of A from a BLoB adapter; ``--keep`` carries the reports of
runs whose adapter is gone (not published) into the next report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import load_script


def _blob_run(path: Path, rho: float) -> Path:
    adapter = path / "adapter"
    adapter.mkdir(parents=True)
    config = {"default": {"std_param": "square", "prior_std": 0.2, "init_std": 0.05}}
    (adapter / "blob_config.json").write_text(json.dumps(config))
    save_file(
        {
            "base_model.model.lm_head.lora_A_rho.weight": torch.full((2, 3), rho),
            "base_model.model.lm_head.lora_A.weight": torch.full((2, 3), -0.5),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    return path


def test_the_std_is_read_and_earlier_reports_are_kept(tmp_path: Path) -> None:
    std_report = load_script("paper/std_report.py", "std_report")
    first, second = _blob_run(tmp_path / "a", 0.3), _blob_run(tmp_path / "b", 0.2)
    report = tmp_path / "std.json"
    assert std_report.main([str(first), "--json", str(report)]) == 0
    (row,) = json.loads(report.read_text())
    layer = row["layers"]["lm_head"]
    assert layer["quantiles"]["q50"] == pytest.approx(0.09)  # rho squared
    assert layer["mean_abs_M"] == pytest.approx(0.5) and layer["n"] == 6

    (tmp_path / "a" / "adapter" / "adapter_model.safetensors").unlink()  # a new machine
    assert std_report.main([str(second), "--json", str(report), "--keep", str(report)]) == 0
    rows = json.loads(report.read_text())
    assert [r["run"] for r in rows] == [str(first), str(second)]
    assert rows[1]["layers"]["lm_head"]["quantiles"]["q50"] == pytest.approx(0.04)

    shutil.rmtree(second)  # the run trained again: its new report replaces the earlier one
    _blob_run(second, 0.1)
    assert std_report.main([str(second), "--json", str(report), "--keep", str(report)]) == 0
    rows = json.loads(report.read_text())
    assert [r["run"] for r in rows] == [str(first), str(second)]
    assert rows[1]["layers"]["lm_head"]["quantiles"]["q50"] == pytest.approx(0.01)
    (tmp_path / "bad.json").write_text('{"run": 1}')
    with pytest.raises(SystemExit, match="expected the list of reports"):
        std_report.main([str(second), "--keep", str(tmp_path / "bad.json")])
