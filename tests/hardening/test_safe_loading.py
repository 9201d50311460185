"""Weights come only through safetensors, model code runs only with --trust-remote-code, and an
adapter or checkpoint made for another base model is refused with one clear line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from blob_lora.cli.main import main
from blob_lora.training import checkpoint as ckpt
from tests.faults.tiny_run import base_args, error_line, one_thread


def _train(assets, out, model=None, *extra):
    args = base_args(
        assets, out, "--batch-size", "4", "--max-steps", "3", "--checkpoint-every", "1",
        "--eval-samples", "0", *extra,
    )  # fmt: skip
    if model is not None:
        args[args.index("--model") + 1] = str(model)
    with one_thread():
        return main(args), args


@pytest.fixture
def no_pickle(monkeypatch):
    """Fail the test if anything unpickles weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle-based load path")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture(scope="module")
def blob_run(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("blob") / "run"
    rc, _ = _train(assets, run, None, "--method", "blob")
    assert rc == 0
    return run


def test_train_resume_and_evaluate_never_unpickle(assets, tmp_path, no_pickle) -> None:
    run = tmp_path / "run"
    rc, args = _train(assets, run, None, "--method", "blob")
    assert rc == 0
    shutil.rmtree(run / "adapter")
    with one_thread():
        assert main([*args, "--resume"]) == 0
        assert (
            main(["evaluate", "--run", str(run), "--out", str(tmp_path / "ev"), "--no-progress"])
            == 0
        )
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_examples"] == 7


@pytest.mark.parametrize("method", ["blob", "lora"])
def test_evaluate_with_another_base_model_is_refused(
    assets, blob_run, tmp_path, capsys, method
) -> None:
    run = blob_run
    if method == "lora":
        run = tmp_path / "lora"
        assert _train(assets, run, None, "--method", "lora")[0] == 0
    out = tmp_path / "ev"
    argv = ["evaluate", "--run", str(run), "--model", str(assets.other_model)]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("blob-lora evaluate: error: adapter in ")
    assert "does not fit this model" in err
    if method == "blob":
        assert "shape mismatch (adapter made for another base model?)" in err
        assert "saved (8, 32), model (8, 48)" in err
    else:
        assert "made for another base model? " in err and "size mismatch for " in err
    assert not out.exists()


def test_resume_with_another_model_path_is_refused(assets, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    rc, args = _train(assets, run, None, "--method", "blob", "--evaluate", "false")
    assert rc == 0
    args[args.index("--model") + 1] = str(assets.other_model)
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "settings differ" in err and "model (" in err


def test_resume_when_the_model_folder_changed_underneath(assets, tmp_path, capsys) -> None:
    """Same --model path, other weights (re-exported at another size): the checkpoint's
    shapes do not fit, and the checkpoint itself is left untouched."""
    model = tmp_path / "model"
    shutil.copytree(assets.model, model)
    run = tmp_path / "run"
    rc, args = _train(assets, run, model, "--method", "blob", "--evaluate", "false")
    assert rc == 0
    shutil.rmtree(run / "adapter")
    shutil.rmtree(model)
    shutil.copytree(assets.other_model, model)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-00000003").iterdir()}
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model (made for another base model?)" in err
    assert "shape (8, 32) there, (8, 48) here" in error_line(err)
    after = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-00000003").iterdir()}
    assert before == after
    ckpt.verify_checkpoint(run / "checkpoints" / "step-00000003")


def test_pickled_adapter_is_refused(assets, blob_run, tmp_path, capsys, no_pickle) -> None:
    run = tmp_path / "run"
    shutil.copytree(blob_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(weights), run / "adapter" / "adapter_model.bin")
    weights.unlink()
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 2
    assert "pickled adapter_model.bin; blob-lora loads safetensors only" in capsys.readouterr().err


def test_pickled_model_weights_are_refused(assets, tmp_path, capsys, no_pickle) -> None:
    model = tmp_path / "model"
    shutil.copytree(assets.model, model)
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    with open(model / "pytorch_model.bin", "wb") as f:
        torch.save(state, f)
    rc, _ = _train(assets, tmp_path / "run", model)
    assert rc == 2
    err = capsys.readouterr().err
    assert "pickled *.bin weights: blob-lora loads safetensors only" in err
    assert not (tmp_path / "run").exists()


def test_model_code_runs_only_with_trust_remote_code(assets, tmp_path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(assets.model, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
    config["model_type"] = "custom_x"
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "EXECUTED"
    (model / "configuration_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    rc, _ = _train(assets, tmp_path / "run", model)
    assert rc == 2
    err = capsys.readouterr().err
    assert "ships its own Python code" in err and "--trust-remote-code" in err
    assert not marker.exists()
    assert not (tmp_path / "run").exists()
