"""Task collections for meta-learning (``tasks/collection.py``): how a collection is named,
the seeded split into meta-train and held-out tasks, the k-shot draws, and bad collections
refused with the folder, file and line named."""

from __future__ import annotations

import pytest

from blob_lora.tasks import MMLU_SUBJECTS
from blob_lora.tasks.collection import (
    PAPER_TASKS,
    collection_names,
    load_pool,
    split_tasks,
    task_seed,
)
from blob_lora.utils.errors import ConfigError, DataError
from tests.factories import tiny_task_collection


def test_named_collections():
    assert collection_names("mmlu") == [f"mmlu:{s}" for s in MMLU_SUBJECTS]
    assert len(collection_names("mmlu")) == 57
    assert collection_names("paper") == list(PAPER_TASKS) and len(PAPER_TASKS) == 6
    assert collection_names(" arc_easy , boolq ") == ["arc_easy", "boolq"]


def test_a_folder_of_task_folders_is_a_collection(tmp_path):
    tiny_task_collection(tmp_path, n_tasks=3)
    (tmp_path / "notes").mkdir()  # no evaluation split: not a task
    names = collection_names(str(tmp_path))
    assert names == [str(tmp_path / f"task{i}") for i in range(3)]
    pool = load_pool(names[1])
    assert len(pool.examples) == 10 and pool.task.n_options == 3


def test_bad_collections_are_refused_clearly(tmp_path):
    with pytest.raises(DataError, match=f"task collection {tmp_path / 'nope'} is not a folder"):
        collection_names(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="holds no task: expected sub-folders with validation"):
        collection_names(str(tmp_path))
    tiny_task_collection(tmp_path / "one", n_tasks=1)
    with pytest.raises(ConfigError, match="holds 1 task.*needs at least 2"):
        collection_names(str(tmp_path / "one"))
    with pytest.raises(ConfigError, match="names a task twice"):
        collection_names("arc_easy,arc_easy")


def test_a_malformed_row_names_its_file_and_line(tmp_path):
    tiny_task_collection(tmp_path, n_tasks=2)
    path = tmp_path / "task1" / "validation.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = '{"question": "no choices", "answer": 0}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}, line 4: .*choices"):
        load_pool(str(tmp_path / "task1"))


def test_the_held_out_tasks_are_drawn_by_the_seed():
    names = [f"t{i}" for i in range(10)]
    train, test = split_tasks(names, 3, seed=1)
    assert len(test) == 3 and sorted(train + test) == sorted(names)
    assert not set(train) & set(test)
    assert split_tasks(names, 3, seed=1) == (train, test)  # reproducible
    others = {tuple(split_tasks(names, 3, seed=s)[1]) for s in range(2, 8)}
    assert len(others - {tuple(test)}) >= 4  # the seed matters
    assert train == [n for n in names if n in train]  # the collection's order kept
    for bad in (0, 10):
        with pytest.raises(ConfigError, match="--meta-test-tasks must be between 1 and 9"):
            split_tasks(names, bad, seed=1)


def test_support_and_evaluation_questions_are_disjoint_and_seeded(tmp_path):
    tiny_task_collection(tmp_path, n_tasks=2, n_questions=10)
    pool = load_pool(str(tmp_path / "task0"))
    support, rest = pool.draw(4, None, seed=5)
    assert len(support) == 4 and len(rest) == 6
    assert {e.id for e in support}.isdisjoint(e.id for e in rest)
    assert pool.draw(4, None, seed=5) == (support, rest)
    assert pool.draw(4, None, seed=6)[0] != support
    assert len(pool.draw(4, 3, seed=5)[1]) == 3
    with pytest.raises(DataError, match="has 10 questions; the protocol needs k-shot 10 plus"):
        pool.draw(10, None, seed=5)


def test_task_seed_is_stable_and_task_specific():
    assert task_seed(3, "mmlu:anatomy") == task_seed(3, "mmlu:anatomy")
    assert task_seed(3, "mmlu:anatomy") != task_seed(3, "mmlu:virology")
    assert task_seed(3, "a") != task_seed(4, "a")
    assert task_seed(3, "ab") != task_seed(3, "ba")  # the order of characters counts


def test_mmlu_subjects_come_from_the_data_root(data_root):
    pool = load_pool("mmlu:anatomy", data_root)
    assert pool.task.n_options == 4 and len(pool.examples) == 135  # its test split
    assert all(e.id.startswith("mmlu-anatomy-") for e in pool.examples)
