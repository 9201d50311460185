"""A comma-separated option (``--target-modules``, ``--bayesian-layers``) splits at the commas
outside brackets, so a regular expression keeps its own commas."""

from __future__ import annotations

import argparse

import pytest

from blob_lora.cli.options import add_train_options, merge_config


@pytest.mark.parametrize(
    ("text", "entries"),
    [
        ("q_proj,v_proj, lm_head", ["q_proj", "v_proj", "lm_head"]),
        (r".*\.layers\.(2[2-9])\.self_attn\.(q_proj|v_proj),lm_head",
         [r".*\.layers\.(2[2-9])\.self_attn\.(q_proj|v_proj)", "lm_head"]),
        (r".*\.layers\.[0-9]{1,2}\.mlp\.up_proj", [r".*\.layers\.[0-9]{1,2}\.mlp\.up_proj"]),
        (r".*[a,b]_proj,lm_head", [r".*[a,b]_proj", "lm_head"]),
        (r"x\(,y", [r"x\(", "y"]),  # an escaped bracket opens nothing
    ],
)  # fmt: skip
def test_commas_inside_an_expression_stay_in_it(text, entries) -> None:
    parser = argparse.ArgumentParser()
    add_train_options(parser)
    args = parser.parse_args(["--target-modules", text, "--bayesian-layers", text])
    assert args.target_modules == entries and args.bayesian_layers == entries
    # the same text from a config file
    assert merge_config({"target_modules": text}, {}).lora.target_modules == entries


def test_a_task_folder_whose_name_holds_a_comma_is_one_task(tmp_path, monkeypatch) -> None:
    """Such a folder trained, but ``--eval-tasks`` and ``evaluate --task`` split its name;
    ``~`` is expanded as tasks expand it, and other lists (modules) split as before."""
    from blob_lora.cli.commands.core import OOD_TASKS, _task_list

    folder = tmp_path / "mine,v2"
    folder.mkdir()
    parser = argparse.ArgumentParser()
    add_train_options(parser)
    assert parser.parse_args(["--eval-tasks", str(folder)]).eval_tasks == [str(folder)]
    assert _task_list(str(folder)) == [str(folder)]
    assert merge_config({"eval_tasks": str(folder)}, {}).evaluation.eval_tasks == [str(folder)]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _task_list("~/mine,v2") == ["~/mine,v2"]
    assert parser.parse_args(["--eval-tasks", "~/mine,v2"]).eval_tasks == ["~/mine,v2"]
    # a list of tasks, or a folder that is not there, still splits at its commas
    assert _task_list(f"arc_easy,{tmp_path / 'absent,x'}") == [
        "arc_easy",
        f"{tmp_path}/absent",
        "x",
    ]
    assert parser.parse_args(["--eval-tasks", "arc_easy,ood"]).eval_tasks == ["arc_easy", "ood"]
    # both options split a list alike: not at a comma inside brackets (str.split did, here)
    listed = f"arc_easy, ood,{tmp_path / 'runs[1,2]'}"
    assert _task_list(listed)[0] == "arc_easy" and _task_list(listed)[-1].endswith("runs[1,2]")
    assert parser.parse_args(["--eval-tasks", listed]).eval_tasks[-1].endswith("runs[1,2]")
    assert len(_task_list(listed)) == 2 + len(OOD_TASKS)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q_proj,v_proj").mkdir()  # a folder is no reason to keep modules together
    assert parser.parse_args(["--target-modules", "q_proj,v_proj"]).target_modules == [
        "q_proj",
        "v_proj",
    ]
