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


def test_keep_existing_keeps_a_folder_made_meanwhile_and_drops_the_new_one(tmp_path) -> None:
    from blob_lora.utils.atomic import atomic_directory

    target = tmp_path / "model"
    with atomic_directory(target, keep_existing=True) as tmp:
        (tmp / "w").write_text("first")
    assert (target / "w").read_text() == "first"  # nothing there: the new folder lands
    with atomic_directory(target, keep_existing=True) as tmp:
        (tmp / "w").write_text("second")
    assert (target / "w").read_text() == "first"  # there: kept, the new one dropped
    with atomic_directory(target) as tmp:
        (tmp / "w").write_text("third")
    assert (target / "w").read_text() == "third"  # the default replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left
