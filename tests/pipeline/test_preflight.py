"""Evaluation splits that cannot be scored stop a run before its first step, not after all of
its training (``training.setup.check_evaluation_inputs``), for plain and composite methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blob_lora.tasks import get_task, task_inputs
from blob_lora.training.config import TrainConfig
from blob_lora.utils.errors import ConfigError, DataError
from tests.factories import TINY_TASK, TINY_TRAIN_SPLIT, tiny_run_config, train_tiny

torch.set_num_threads(1)


def _task(folder: Path, n_train: int = 8, n_eval: int = 3, option: str = "yes") -> Path:
    folder.mkdir(parents=True)
    row = {"question": "Is it?", "choices": [option, "no"], "answer": 0}
    (folder / "train.jsonl").write_text((json.dumps(row) + "\n") * n_train)
    (folder / "validation.jsonl").write_text((json.dumps(row) + "\n") * n_eval)
    return folder


def test_an_empty_split_names_its_file(tmp_path, char_tok):
    task = get_task(str(_task(tmp_path / "t", n_eval=0)))
    with pytest.raises(
        DataError, match=r"split 'validation' holds no examples \(.*validation.jsonl\)"
    ):
        task_inputs(task, "eval", char_tok, 64)
    full = get_task(str(_task(tmp_path / "u", n_eval=4)))
    with pytest.raises(DataError, match=r"split 'validation\[5:\]' holds no examples"):
        task_inputs(full, "validation[5:]", char_tok, 64)
    assert len(task_inputs(full, "validation[3:]", char_tok, 64).dataset) == 1


@pytest.mark.parametrize("method", ["lora", "ensemble"])
def test_an_empty_evaluation_split_stops_the_run_before_training(
    tmp_path, data_root, char_base, char_tok, method
):
    empty = _task(tmp_path / "empty_eval", n_eval=0)
    out = tmp_path / method
    cfg = tiny_run_config(out, data_root, method, eval_tasks=[str(empty)])
    with pytest.raises(DataError, match="holds no examples"):
        train_tiny(cfg, char_base, char_tok)
    assert not out.exists()  # nothing trained, no half-made run


def test_an_overlong_evaluation_prompt_stops_the_run_before_training(
    tmp_path, data_root, char_base, char_tok
):
    long = _task(tmp_path / "long", option="x" * 400)
    out = tmp_path / "lora"
    cfg = tiny_run_config(out, data_root, "lora", eval_tasks=[str(long)])
    with pytest.raises(DataError, match="more than max_length=256"):
        train_tiny(cfg, char_base, char_tok)
    assert not out.exists()


def test_evaluation_splits_follow_the_settings():
    cfg = TrainConfig(task="a", eval_split="validation[:9]", eval_tasks=["b", "a", "c"])
    assert cfg.evaluation_splits() == [("a", "validation[:9]"), ("b", "eval"), ("c", "eval")]
    assert TrainConfig(task="a").evaluation_splits() == [("a", "eval")]
    assert TrainConfig(task="a", evaluate=False, eval_tasks=["b"]).evaluation_splits() == []


def test_the_checked_evaluation_is_the_one_made(
    tmp_path, data_root, char_base, char_tok, monkeypatch
):
    """The splits checked before training are the splits scored after it, in order."""
    import blob_lora.evaluation.evaluate as evaluation
    import blob_lora.training.setup as setup

    def spy(module, calls):
        real = module.task_inputs

        def recording(task, split, *args, **kwargs):
            calls.append((task.name, split))
            return real(task, split, *args, **kwargs)

        monkeypatch.setattr(module, "task_inputs", recording)

    checked: list = []
    scored: list = []
    spy(setup, checked)
    spy(evaluation, scored)
    own_slice = _task(tmp_path / "extra", n_eval=2)
    cfg = tiny_run_config(tmp_path / "lora", data_root, "lora", eval_tasks=[str(own_slice)])
    summary = train_tiny(cfg, char_base, char_tok)
    assert scored == [(TINY_TASK, "validation[:6]"), (str(own_slice), "eval")]
    assert checked == [(TINY_TASK, TINY_TRAIN_SPLIT), *scored]  # the training split, then these
    assert summary["evaluations"][TINY_TASK]["n_examples"] == 6


def _rows(n: int, answer: int) -> str:
    row = {"question": "Is it?", "choices": ["yes", "no"], "answer": answer}
    return (json.dumps(row) + "\n") * n


@pytest.mark.parametrize("method", ["lora", "ensemble"])
def test_a_run_is_not_continued_on_changed_training_data(tmp_path, char_base, char_tok, method):
    """A resumed run used to train on whatever the files held now, mixing two data sets
    without a word; a composite reused its finished sub-runs of the old data."""
    task = _task(tmp_path / "mine")
    out = tmp_path / method
    cfg = TrainConfig(
        model="unused", task=str(task), method=method, out=str(out), max_steps=2,
        batch_size=4, max_length=64, target_modules=["q_proj"], ensemble_size=2, eval_samples=2,
    )  # fmt: skip
    summary = train_tiny(cfg, char_base, char_tok)
    assert summary["train_data"].startswith("file:train.jsonl:")
    (out / "summary.json").unlink()  # as if stopped before its end
    train_tiny(cfg, char_base, char_tok, resume=True)  # the same data: goes on
    (out / "summary.json").unlink()
    (task / "train.jsonl").write_text(_rows(8, answer=1))
    with pytest.raises(ConfigError, match="training data of .* has changed since it was trained"):
        train_tiny(cfg, char_base, char_tok, resume=True)


def test_resume_without_a_checkpoint_says_it_starts_over(
    tmp_path, data_root, char_base, char_tok, capsys
):
    import shutil

    cfg = tiny_run_config(tmp_path / "lora", data_root, "lora")
    first = train_tiny(cfg, char_base, char_tok)
    (tmp_path / "lora" / "summary.json").unlink()
    shutil.rmtree(tmp_path / "lora" / "checkpoints")  # killed before its first checkpoint
    capsys.readouterr()
    again = train_tiny(cfg, char_base, char_tok, resume=True)
    assert "holds no checkpoint yet; training from step 0" in capsys.readouterr().err
    assert again["steps"] == first["steps"] == 3
