"""Commands other than ``train`` refuse a multi-process launch: every process would do all of
the work and write the same files at once."""

from __future__ import annotations

import pytest

from blob_lora.cli.main import build_parser, main
from blob_lora.cli.registry import COMMANDS, MULTI_PROCESS


@pytest.mark.parametrize("name", ["evaluate", "predict", "compare", "demo", "meta-evaluate"])
def test_a_one_process_command_refuses_several(name, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = {
        "evaluate": ["evaluate", "--run", str(tmp_path)],
        "predict": ["predict", "--run", str(tmp_path), "--input", "-", "--out", "o.jsonl"],
        "compare": ["compare", "--config", str(tmp_path / "c.yaml")],
        "demo": ["demo", "--out", str(tmp_path / "demo")],
        "meta-evaluate": ["meta-evaluate", "--run", str(tmp_path)],
    }[name]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2" in err and f"run 'blob-lora {name}' as one process" in err
    assert not (tmp_path / "demo").exists()


def test_only_train_runs_on_several_processes() -> None:
    build_parser()  # imports every command module: the registry is complete
    assert {"train"} == MULTI_PROCESS and {"evaluate", "predict", "meta-train"} <= set(COMMANDS)
