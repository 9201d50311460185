"""``atomic_remove``: a file or a folder gone at once, never seen half removed."""

from __future__ import annotations

import os

from blob_lora.utils.atomic import atomic_remove


def test_removes_a_file_a_folder_and_nothing(tmp_path) -> None:
    (tmp_path / "f.json").write_text("{}")
    folder = tmp_path / "checkpoints" / "step-00000001"
    folder.mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(b"x")
    atomic_remove(tmp_path / "f.json")
    atomic_remove(tmp_path / "checkpoints")
    atomic_remove(tmp_path / "missing")  # nothing there: nothing to do
    assert os.listdir(tmp_path) == []


def test_the_leftover_of_a_removal_cut_short_goes_with_the_next(tmp_path) -> None:
    leftover = tmp_path / ".checkpoints.removed"  # renamed, then killed before the delete
    (leftover / "step-00000001").mkdir(parents=True)
    (tmp_path / "checkpoints").mkdir()
    atomic_remove(tmp_path / "checkpoints")
    assert os.listdir(tmp_path) == []
    leftover.mkdir()
    atomic_remove(tmp_path / "checkpoints")  # the folder is gone already: the leftover still goes
    assert os.listdir(tmp_path) == []
