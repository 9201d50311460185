"""Task result folders: readable, never the evaluation folder itself or a hidden one, and two
tasks that would share one are refused before anything is trained or written."""

from __future__ import annotations

import pytest

from blob_lora.comparison import spec_from_dict
from blob_lora.tasks.dir_names import NAME_LIMIT, SHORT_NAME, check_distinct_dirs, task_dir_name
from blob_lora.training.config import TrainConfig
from blob_lora.training.setup import check_evaluation_inputs
from blob_lora.utils.errors import ConfigError


def test_folder_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert task_dir_name("mmlu:college_physics") == "mmlu__college_physics"
    assert task_dir_name("data/mine") == "data_mine"
    assert task_dir_name("/abs/mine") == "_abs_mine"  # as before: existing runs keep their folders
    assert task_dir_name("./mine") == "mine"  # was "._mine", a hidden folder
    assert task_dir_name("./a/../mine/") == "mine"
    assert task_dir_name(".") == tmp_path.name  # was ".": the evaluation folder itself
    assert task_dir_name("../x/y") == "x_y"


def test_tasks_sharing_a_folder_are_refused(tmp_path):
    check_distinct_dirs(["arc_easy", "x/y", "arc_easy"], "--task")  # a repeat is the same task
    with pytest.raises(ConfigError, match=r"tasks 'x/y' and 'x_y' would write .* folder 'x_y'"):
        check_distinct_dirs(["x/y", "x_y"], "--task")
    with pytest.raises(ConfigError, match="compare: tasks 'x/y' and 'x_y'"):
        spec_from_dict({"methods": ["lora"], "tasks": ["x/y", "x_y"]}, name="c", out=tmp_path)
    cfg = TrainConfig(task="x/y", eval_tasks=["x_y"])
    with pytest.raises(ConfigError, match="--eval-tasks: tasks 'x/y' and 'x_y'"):
        check_evaluation_inputs(cfg, tokenizer=None)  # refused before any data is read


def test_a_name_too_long_for_a_file_name_is_shortened_to_its_end_and_a_digest():
    """A task folder's whole path becomes one folder name; past 255 bytes ``mkdir`` fails
    (found after a whole training run), and the files named after it (compare's plots and
    claims) need ~50 bytes more, so a name past 200 bytes is cut to its end plus a digest."""
    deep = "/data/" + "/".join(
        f"experiment-round-{i}-with-a-long-descriptive-name" for i in range(6)
    )
    assert len(deep.encode()) > 255
    folder = task_dir_name(deep)
    assert len(folder.encode()) <= SHORT_NAME
    assert folder.endswith("experiment-round-5-with-a-long-descriptive-name")
    assert folder == task_dir_name(deep)  # the same folder on every call
    other = deep.replace("round-0", "round-9")  # differs only where the cut removed it
    assert task_dir_name(other) != folder and task_dir_name(other)[12:] == folder[12:]
    multi = "/d/" + "é" * 200  # 400 bytes of two-byte characters
    assert len(task_dir_name(multi).encode()) <= SHORT_NAME
    assert task_dir_name(multi).endswith("é" * 50)
    at_limit = "x" * NAME_LIMIT  # a name earlier runs could write keeps its folder
    assert task_dir_name(at_limit) == at_limit
    assert len(task_dir_name("y" * (NAME_LIMIT + 1))) <= SHORT_NAME
