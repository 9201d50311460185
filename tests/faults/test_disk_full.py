"""A full disk or an unwritable run folder fails with one clear line (exit status 2) and
leaves the previous checkpoint intact, so ``--resume`` later ends on the uninterrupted adapter.

Tests run as root, for whom a read-only chmod changes nothing, so the failures are injected
with monkeypatch at the write calls (``OSError`` with ENOSPC / EACCES, as the OS raises them).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from blob_lora.cli.main import main
from blob_lora.training import checkpoint as ckpt
from blob_lora.training import run_dir, trainer
from tests.faults.tiny_run import adapter, base_args, error_line, one_thread, train_log

STEPS = 4


def _args(assets, out, *extra):
    return base_args(
        assets,
        out,
        "--method", "blob", "--batch-size", "4", "--max-steps", str(STEPS),
        "--checkpoint-every", "1", "--evaluate", "false", *extra,
    )  # fmt: skip


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    with one_thread():
        assert main(_args(assets, run)) == 0
    return run


def _same_as_reference(run, reference) -> None:
    for name, value in adapter(reference).items():
        assert torch.equal(adapter(run)[name], value), name
    assert [r["step"] for r in train_log(run)] == list(range(1, STEPS + 1))


def test_disk_full_during_a_checkpoint(assets, reference, tmp_path, monkeypatch, capsys) -> None:
    real_save_file = ckpt.save_file

    def save_file(tensors, path, *args, **kwargs):
        if ".step-00000003." in str(path):  # the temporary folder of the step-3 checkpoint
            _enospc()
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    run = tmp_path / "run"
    with one_thread():
        assert main(_args(assets, run)) == 2
    err = error_line(capsys.readouterr().err)
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert f"{run / 'checkpoints' / 'step-00000002'} is intact" in err
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    ckpt.verify_checkpoint(root / "step-00000002")
    assert not (run / "adapter").exists()

    monkeypatch.setattr(ckpt, "save_file", real_save_file)  # space freed
    with one_thread():
        assert main([*_args(assets, run), "--resume"]) == 0
    _same_as_reference(run, reference)


def test_disk_full_when_moving_the_latest_pointer(assets, reference, tmp_path, monkeypatch):
    real = ckpt.atomic_write_text
    calls = []

    def atomic_write_text(path, text):
        calls.append(text)
        if Path(path).name == ckpt.LATEST and text.strip() == "step-00000003":
            _enospc()
        return real(path, text)

    monkeypatch.setattr(ckpt, "atomic_write_text", atomic_write_text)
    run = tmp_path / "run"
    with one_thread():
        assert main(_args(assets, run)) == 2
    assert (run / "checkpoints" / ckpt.LATEST).read_text().strip() == "step-00000002"
    monkeypatch.setattr(ckpt, "atomic_write_text", real)
    with one_thread():
        assert main([*_args(assets, run), "--resume"]) == 0
    _same_as_reference(run, reference)


def test_disk_full_when_writing_the_adapter(assets, reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "atomic_directory", _enospc)
    run = tmp_path / "run"
    with one_thread():
        assert main(_args(assets, run)) == 2
    err = capsys.readouterr().err
    assert "could not write the adapter" in err and "--resume" in err
    assert "Traceback" not in err
    ckpt.verify_checkpoint(run / "checkpoints" / f"step-{STEPS:08d}")
    monkeypatch.undo()
    with one_thread():
        assert main([*_args(assets, run), "--resume"]) == 0
    _same_as_reference(run, reference)


def test_unwritable_output_folder(assets, tmp_path, monkeypatch, capsys) -> None:
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name == ".write-test":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    out = tmp_path / "run"
    assert main(_args(assets, out)) == 2
    err = capsys.readouterr().err
    assert f"cannot write into {out}" in err and "Permission denied" in err
    assert not out.exists() or not any(out.iterdir())  # no partial run folder


def test_run_config_write_fails(assets, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(run_dir, "atomic_write_json", _enospc)
    out = tmp_path / "run"
    assert main(_args(assets, out)) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out / 'run_config.json'}" in err and "No space left" in err
    assert not (out / "run_config.json").exists()


def test_failed_input_leaves_no_run_folder(assets, tmp_path, capsys) -> None:
    """Bad data is found before the run folder is made: the same command works once fixed."""
    task = tmp_path / "task"
    shutil.copytree(assets.task, task)
    (task / "train.jsonl").write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    args = base_args(assets, tmp_path / "run", "--max-steps", "1", "--evaluate", "false")
    args[args.index("--task") + 1] = str(task)
    assert main(args) == 2
    assert "line 1: needs at least 2 options" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    shutil.copy(assets.task / "train.jsonl", task / "train.jsonl")
    with one_thread():
        assert main(args) == 0
