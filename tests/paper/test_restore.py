"""paper/restore.py puts a published table back on a new machine: its runs count finished and
their predictions pool into the diagrams again; no weights are published, so an ensemble added
later trains its member 0 itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from blob_lora.cli.main import main as cli
from tests.conftest import load_script
from tests.factories import tiny_compare_experiment, tiny_model_folder

torch.set_num_threads(1)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    (path,) = list((run / "adapter").glob("*.safetensors"))
    return load_file(str(path))


def _compare(config: Path, data_root: Path, *extra: str) -> int:
    args = ["compare", "--config", str(config), "--no-progress", "--data-root", str(data_root)]
    return cli([*args, *extra])


def test_a_published_table_restored_on_a_new_machine_continues(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    publish = load_script("paper/publish.py", "publish")
    restore = load_script("paper/restore.py", "restore")
    monkeypatch.setenv("BLOB_LORA_DATA", str(data_root))
    exp = tiny_compare_experiment(tiny_model_folder(tmp_path / "model"), ["lora"])
    exp.update(name="tiny", out=str(tmp_path / "out"))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(exp))
    assert _compare(config, data_root) == 0
    lora = tmp_path / "out" / "runs" / "winogrande_s" / "lora" / "seed1"
    preds = (lora / "eval" / "winogrande_s" / "predictions.jsonl").read_bytes()

    results = tmp_path / "results"
    publish.main([str(config), str(results)])
    assert "paper/restore.py" in (results / "PROVENANCE.md").read_text()
    assert not list(results.rglob("*.safetensors"))  # records only, no weights in git

    os.replace(tmp_path / "out", tmp_path / "lost")  # the new machine: paper/out/ is gone
    restore.main([str(config), str(results)])
    assert "restored 1 runs" in capsys.readouterr().out
    assert (lora / "eval" / "winogrande_s" / "predictions.jsonl").read_bytes() == preds
    restore.main([str(config), str(results)])  # a second time: nothing to do
    assert "restored 0 runs" in capsys.readouterr().out

    # the restored run counts finished; the ensemble added now trains its member 0 itself
    exp.update(
        methods=["lora", "ensemble"],
        method_options={"ensemble": {"ensemble_size": 2, "ensemble_share_seed": True}},
    )
    config.write_text(yaml.safe_dump(exp))
    assert _compare(config, data_root) == 0
    assert "2 runs, 1 finished, 1 to train" in capsys.readouterr().out
    member0 = tmp_path / "out" / "runs" / "winogrande_s" / "ensemble" / "seed1" / "members" / "0"
    assert "shared_from" not in json.loads((member0 / "summary.json").read_text())
    retrained, weights = (
        _weights(member0),
        _weights(tmp_path / "lost" / lora.relative_to(tmp_path / "out")),
    )
    assert all(torch.equal(retrained[n], weights[n]) for n in weights)  # the same training
