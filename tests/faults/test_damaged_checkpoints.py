"""A half-written or damaged checkpoint is never taken for a good one.

The reference run trains 6 steps with a checkpoint after each (the two newest are kept). Each
case damages the newest checkpoint the way a crash, a full disk or a hand edit would; resuming
must skip it, fall back to step 5, train step 6 again and end on the reference adapter
bitwise. When no checkpoint is intact, resuming fails with one clear line.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from blob_lora.cli.main import main
from blob_lora.training import checkpoint as ckpt
from blob_lora.utils.errors import CheckpointError
from tests.faults.tiny_run import adapter, base_args, one_thread, train_log

STEPS = 6


def _args(assets, out, *extra):
    return base_args(
        assets,
        out,
        "--method", "blob", "--batch-size", "4", "--max-steps", str(STEPS),
        "--checkpoint-every", "1", "--evaluate", "false", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    with one_thread():
        assert main(_args(assets, run)) == 0
    return run


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _newest(run):
    return run / "checkpoints" / f"step-{STEPS:08d}"


DAMAGE = {
    "truncated weights": lambda run: _truncate(_newest(run) / "trainable.safetensors"),
    "flipped byte in optimiser state": lambda run: _flip_byte(_newest(run) / "optim.safetensors"),
    "no manifest (killed before it was written)": lambda run: (
        _newest(run) / ckpt.MANIFEST
    ).unlink(),
    "missing rng file": lambda run: (_newest(run) / "rng.safetensors").unlink(),
    "corrupt manifest": lambda run: (_newest(run) / ckpt.MANIFEST).write_text("{not json"),
    "edited state.json": lambda run: (_newest(run) / "state.json").write_text(
        json.dumps({"step": 6, "epoch": 0, "micro_in_epoch": 0})
    ),
    "latest points nowhere": lambda run: (
        shutil.rmtree(_newest(run)),
        (run / "checkpoints" / ckpt.LATEST).write_text("step-00000099\n"),
    ),
    "latest is garbage": lambda run: (
        _truncate(_newest(run) / "rng.json"),
        (run / "checkpoints" / ckpt.LATEST).write_bytes(b"\xff\xfe../../etc"),
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(assets, reference, tmp_path, case, caplog):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "adapter")
    DAMAGE[case](run)
    # a leftover temporary folder of an interrupted write is ignored, then cleaned up
    stale = run / "checkpoints" / ".step-00000007.abc.tmp"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"partial")

    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step-00000005"
    with one_thread():
        assert main([*_args(assets, run), "--resume"]) == 0
    assert "step-00000006" in caplog.text or case == "latest points nowhere"
    for name, value in adapter(reference).items():
        assert torch.equal(adapter(run)[name], value), name
    assert [r["step"] for r in train_log(run)] == list(range(1, STEPS + 1))
    assert not stale.exists()
    ckpt.verify_checkpoint(_newest(run))  # rewritten intact


def test_no_intact_checkpoint_is_a_clear_error(assets, reference, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "adapter")
    for folder in (run / "checkpoints").glob("step-*"):
        _truncate(folder / "trainable.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint found"):
        ckpt.latest_checkpoint(run / "checkpoints")
    assert main([*_args(assets, run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint found" in err and "does not match its checksum" in err
    assert "Traceback" not in err
    assert not (run / "adapter").exists()


def test_checkpoint_files_are_safetensors_and_json_only(reference) -> None:
    folder = ckpt.latest_checkpoint(reference / "checkpoints")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "manifest.json", "optim.json", "optim.safetensors", "rng.json", "rng.safetensors",
        "state.json", "trainable.safetensors",
    ]  # fmt: skip
    for p in folder.iterdir():
        assert not p.read_bytes().startswith(b"\x80")  # no pickle protocol header
