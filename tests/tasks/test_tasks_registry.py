"""Registry, split resolution and official split sizes read from the shared data folder."""

from __future__ import annotations

import pytest

from blob_lora.tasks import MMLU_SUBJECTS, get_task, list_tasks, parse_split
from blob_lora.utils.errors import ConfigError, DataError

PAPER = ["winogrande_s", "winogrande_m", "arc_challenge", "arc_easy", "openbookqa", "boolq"]


def test_list_tasks_has_paper_tasks_and_57_mmlu_subjects():
    names = list_tasks()
    assert names[:6] == PAPER
    assert len(MMLU_SUBJECTS) == 57
    assert names[6:] == [f"mmlu:{s}" for s in MMLU_SUBJECTS]
    assert "mmlu:college_chemistry" in names and "mmlu:college_physics" in names


@pytest.mark.parametrize(
    "name, train, n_train, n_eval, n_options",
    [
        ("winogrande_s", "train_s", 640, 1267, 2),
        ("winogrande_m", "train_m", 2558, 1267, 2),
        ("arc_challenge", "train", 1119, 299, 5),
        ("arc_easy", "train", 2251, 570, 5),
        ("openbookqa", "train", 4957, 500, 4),
        ("mmlu:college_chemistry", "dev", 5, 100, 4),
        ("mmlu:college_physics", "dev", 5, 102, 4),
    ],
)
def test_official_split_sizes(data_root, name, train, n_train, n_eval, n_options):
    task = get_task(name, data_root)
    assert task.train_split == train
    assert task.n_options == n_options
    assert len(task.load("train")) == n_train
    assert len(task.load(train)) == n_train
    assert len(task.load("eval")) == n_eval


def test_boolq_eval_size_and_label_direction(data_root):
    task = get_task("boolq", data_root)
    assert (task.train_split, task.eval_split) == ("train", "validation")
    assert task.option_letters == ("True", "False")
    ev = task.load("eval")
    assert len(ev) == 3270
    # data README: 2033 true, 1237 false; answer true must be the "True" option (index 0)
    assert sum(ex.label == 0 for ex in ev) == 2033
    first = ev[0]  # "does ethanol take more energy make that produces": answer false
    assert first.question.startswith("does ethanol take more energy")
    assert first.choices[first.label] == "False"


def test_boolq_train_missing_names_files_looked_for(data_root):
    task = get_task("boolq", data_root)
    with pytest.raises(DataError) as err:
        task.load("train")
    msg = str(err.value)
    assert str(data_root / "boolq" / "train.jsonl") in msg
    assert str(data_root / "boolq" / "train.jsonl.gz") in msg
    assert "splits present: validation" in msg
    assert "validation[:2270]" in msg


def test_seeded_slices_partition_the_split(data_root):
    task = get_task("boolq", data_root)
    train = task.load("validation[:2270]")
    test = task.load("validation[2270:]")
    assert (len(train), len(test)) == (2270, 1000)
    ids_train, ids_test = {ex.id for ex in train}, {ex.id for ex in test}
    assert not ids_train & ids_test
    assert ids_train | ids_test == {ex.id for ex in task.load("validation")}
    # shuffled with the fixed seed (not file order) and identical on every call
    assert [ex.id for ex in train[:3]] != [ex.id for ex in task.load("validation")[:3]]
    assert [ex.id for ex in task.load("eval[:2270]")] == [ex.id for ex in train]


def test_all_mmlu_subjects_cover_the_files(data_root):
    n_test = n_dev = 0
    for subject in MMLU_SUBJECTS:
        task = get_task(f"mmlu:{subject}", data_root)
        dev = task.load("train")
        assert len(dev) == 5
        n_dev += len(dev)
        n_test += len(task.load("test"))
    assert (n_dev, n_test) == (285, 14042)


def test_arc_numeric_labels_and_five_options(data_root):
    ev = {ex.id: ex for ex in get_task("arc_challenge", data_root).load("validation")}
    numeric = ev["NYSEDREGENTS_2014_8_20"]  # choices labelled "1".."4", answerKey "2"
    assert numeric.label == 1
    assert numeric.choices[1] == "equal to the total mass of the products"
    five = ev["TIMSS_2003_8_pg29"]  # choices A-E, answerKey E
    assert (five.n_options, five.label, five.choices[4]) == (5, 4, "heart")
    three = ev["NYSEDREGENTS_2014_4_4"]
    assert (three.choices, three.label) == (("gas", "liquid", "solid"), 0)


def test_winogrande_labels(data_root):
    ex = get_task("winogrande_s", data_root).load("validation")[0]
    assert ex.id == "3FCO4VKOZ4BJQ6IFC0VAIBK4KTWE7U-2"
    assert (ex.choices, ex.label) == (("Sarah", "Maria"), 1)


def test_env_var_is_the_default_root(data_root, monkeypatch):
    monkeypatch.setenv("BLOB_LORA_DATA", str(data_root))
    task = get_task("arc_easy")
    assert task.source.folder == data_root / "arc_easy"
    assert len(task.load("eval")) == 570


def test_unknown_task_lists_known_names():
    with pytest.raises(ConfigError) as err:
        get_task("arc_hard")
    msg = str(err.value)
    for name in PAPER:
        assert name in msg
    assert "mmlu:<subject>" in msg and "college_physics" in msg


def test_unknown_mmlu_subject():
    with pytest.raises(ConfigError, match="unknown MMLU subject 'alchemy'.*college_chemistry"):
        get_task("mmlu:alchemy")


def test_missing_byo_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        get_task(str(tmp_path / "nope"))


def test_split_syntax():
    assert str(parse_split("validation[:2270]")) == "validation[:2270]"
    spec = parse_split("train[10:-5]")
    assert (spec.name, spec.start, spec.stop, spec.sliced) == ("train", 10, -5, True)
    assert not parse_split("validation").sliced
    with pytest.raises(ConfigError, match="bad split"):
        parse_split("validation[:a]")


def test_aliases_resolve_per_task(data_root):
    task = get_task("winogrande_m", data_root)
    assert str(task.resolve_split("train")) == "train_m"
    assert str(task.resolve_split("train[:100]")) == "train_m[:100]"
    assert str(task.resolve_split("eval")) == "validation"
    assert len(task.load("train[:100]")) == 100
