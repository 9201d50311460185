"""A saved run that cannot be what its settings made is refused with one clear error, before
the base model is loaded: a lost ensemble member, a run_config.json that is not an object."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from blob_lora.cli.main import main
from blob_lora.training.saved_run import load_run, read_run_config
from blob_lora.utils.errors import BlobLoraError, CheckpointError
from tests.factories import tiny_run_config, train_tiny

torch.set_num_threads(1)


def test_an_ensemble_missing_a_member_is_refused(tmp_path, data_root, char_base, char_tok):
    out = tmp_path / "ensemble"
    train_tiny(tiny_run_config(out, data_root, "ensemble"), char_base, char_tok)
    loaded = load_run(out, base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    assert len(loaded.model.ensemble_adapters) == 2
    shutil.rmtree(out / "adapter" / "member-1")  # used to load as an ensemble of one
    with pytest.raises(CheckpointError, match="holds 1 ensemble members, the run trained 2"):
        load_run(out, base_model=copy.deepcopy(char_base), tokenizer=char_tok)


@pytest.mark.parametrize("content", ["[]", "3", '"run"'])
def test_a_run_config_that_is_not_an_object(tmp_path, content):
    (tmp_path / "run_config.json").write_text(content)
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        read_run_config(tmp_path)


def test_predict_will_not_write_over_its_questions(tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    row = {"question": "Q?", "choices": ["a", "b"]}
    questions.write_text(json.dumps(row) + "\n")
    before = questions.read_bytes()
    code = main(["predict", "--run", str(tmp_path / "run"), "--input", str(questions),
                 "--out", str(Path(tmp_path) / "." / "q.jsonl")])  # fmt: skip
    assert code != 0
    assert "is the --input file" in capsys.readouterr().err
    assert questions.read_bytes() == before


def _fabricated_run(proj: Path, **settings) -> Path:
    from blob_lora.training.config import TrainConfig

    run = proj / "runs" / "x"
    run.mkdir(parents=True)
    cfg = TrainConfig(out="runs/x", **settings)
    (run / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    return run


def test_relative_paths_of_a_run_work_from_another_folder(tmp_path, monkeypatch):
    """A run trained with --model tiny --task mine from proj/ and re-opened from elsewhere used
    to look 'tiny' up on the Hub and call 'mine' an unknown task."""
    proj = tmp_path / "proj"
    for folder in ("tiny", "mine", "data", "arc_easy"):
        (proj / folder).mkdir(parents=True)
    _fabricated_run(proj, model="tiny", task="mine", data_root="data")
    monkeypatch.chdir(tmp_path)
    cfg = read_run_config(Path("proj/runs/x"))
    assert (cfg.base.model, cfg.data.task, cfg.data.data_root) == (
        "proj/tiny",
        "proj/mine",
        "proj/data",
    )
    monkeypatch.chdir(proj)  # from the launch folder: as stored
    assert read_run_config(Path("runs/x")).base.model == "tiny"


def test_what_is_not_a_relative_folder_is_left_alone(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "arc_easy").mkdir(parents=True)
    _fabricated_run(proj, model="smollm2-135m", task="arc_easy")
    monkeypatch.chdir(tmp_path)
    cfg = read_run_config(Path("proj/runs/x"))
    assert (cfg.base.model, cfg.data.task) == ("smollm2-135m", "arc_easy")  # a registered name
    (proj / "tiny").mkdir()
    moved = tmp_path / "elsewhere" / "y"
    moved.parent.mkdir()
    _fabricated_run(proj / "b", model="tiny", task="arc_easy").rename(moved)
    assert read_run_config(moved).base.model == "tiny"  # its path no longer ends in runs/x


def test_reloading_on_other_weights_of_the_same_shapes_warns(
    tmp_path, data_root, char_base, char_tok
):
    """An adapter of the right shapes loads on any model of the same architecture; the run
    records its base model's fingerprint, so other weights are noticed (a warning)."""
    import warnings

    from tests.factories import tiny_llama

    out = tmp_path / "lora"
    summary = train_tiny(tiny_run_config(out, data_root, "lora"), char_base, char_tok)
    assert len(summary["base_model"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same weights: no warning
        load_run(out, base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    other = tiny_llama(seed=5, vocab_size=char_base.config.vocab_size)
    assert other.state_dict().keys() == char_base.state_dict().keys()
    with pytest.warns(UserWarning, match="not the ones .* was trained on"):
        load_run(out, base_model=other, tokenizer=char_tok)


def test_train_refuses_a_meta_train_folder_even_with_overwrite(tmp_path) -> None:
    """meta-train refuses a train run's folder; train refuses a meta-train run's. With
    --overwrite, train wrote its run beside meta_config.json, tasks.json and the meta results,
    and meta-evaluate then took the folder for a single-task run."""
    from blob_lora.training.config import TrainConfig
    from blob_lora.training.run_dir import META_RUN_CONFIG, check_run_dir

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / META_RUN_CONFIG).write_text("{}")
    config = TrainConfig(out=str(meta)).to_dict()
    for overwrite, resume in ((False, False), (True, False), (False, True)):
        with pytest.raises(BlobLoraError, match="holds a meta-train run"):
            check_run_dir(meta, config, overwrite=overwrite, resume=resume)
    assert sorted(p.name for p in meta.iterdir()) == [META_RUN_CONFIG]
