"""The Hugging Face Hub path, with datasets.load_dataset stubbed (no network)."""

from __future__ import annotations

import datasets
import pytest

from blob_lora.tasks import get_task
from blob_lora.utils.errors import DataError

HUB = {
    ("allenai/ai2_arc", "ARC-Challenge", "validation"): [
        {
            "id": "Mercury_1",
            "question": "Which is a gas?",
            "choices": {"text": ["rock", "air", "ice"], "label": ["A", "B", "C"]},
            "answerKey": "B",
        },
        {
            "id": "NY_2",
            "question": "Pick two.",
            "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]},
            "answerKey": "2",
        },
    ],
    ("allenai/openbookqa", "main", "train"): [
        {
            "id": "7-1",
            "question_stem": "The sun is a",
            "choices": {"text": ["star", "moon", "rock", "car"], "label": ["A", "B", "C", "D"]},
            "answerKey": "A",
        }
    ],
    ("allenai/winogrande", "winogrande_s", "train"): [
        {
            "sentence": "Ann beat Bo because _ was fast.",
            "option1": "Ann",
            "option2": "Bo",
            "answer": "1",
        }
    ],
    ("google/boolq", None, "train"): [
        {"question": "is water wet", "answer": True, "passage": "Water is wet."},
        {"question": "is fire cold", "answer": False, "passage": "Fire is hot."},
    ],
    ("cais/mmlu", "college_physics", "test"): [
        {
            "question": "c = ?",
            "subject": "college_physics",
            "choices": ["1", "2", "3", "c"],
            "answer": 3,
        }
    ],
    ("cais/mmlu", "college_physics", "dev"): [
        {"question": "bad", "subject": "college_physics", "choices": ["1", "2"], "answer": 5}
    ],
}


@pytest.fixture
def hub(monkeypatch):
    """Stub load_dataset; record calls. No data root: the Hub is the source."""
    monkeypatch.delenv("BLOB_LORA_DATA", raising=False)
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        try:
            return list(HUB[(path, name, split)])
        except KeyError:
            raise ValueError(f"Unknown split {split!r}") from None

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    # the stub is the Hub: reachable, whatever this machine's network
    monkeypatch.setattr("blob_lora.tasks.sources.unreachable_for", lambda *a, **k: None)
    return calls


def test_an_unreachable_hub_is_said_at_once_with_what_to_do(hub, monkeypatch):
    """Offline, a paper task without a local folder fails before ``load_dataset`` (which
    would retry for ~25 s), naming the reason and the option that reads local files."""
    asked = []

    def unreachable(repo_id, filename, repo_type="model"):
        asked.append((repo_id, filename, repo_type))
        return "huggingface.co:443: [Errno -2] Name or service not known"

    monkeypatch.setattr("blob_lora.tasks.sources.unreachable_for", unreachable)
    with pytest.raises(DataError) as info:
        get_task("arc_challenge").load("eval")
    message = str(info.value)
    assert message.startswith("task 'arc_challenge': cannot load hf://datasets/allenai/ai2_arc")
    assert "Hub is unreachable (huggingface.co:443: [Errno -2]" in message
    assert "set BLOB_LORA_DATA or pass --data-root" in message
    assert hub == [] and asked == [("allenai/ai2_arc", "README.md", "dataset")]


def test_a_dataset_prepared_in_the_datasets_cache_still_loads_offline(hub, monkeypatch, tmp_path):
    """``load_dataset`` falls back to its own prepared copy when the Hub is unreachable, even
    where the Hub's file cache lacks the dataset: such a copy is not refused."""
    from blob_lora.utils import hub as hub_mod

    # the real check of the caches, with the Hub's host down
    monkeypatch.setattr("blob_lora.tasks.sources.unreachable_for", hub_mod.unreachable_for)
    monkeypatch.setattr(hub_mod, "hub_unreachable", lambda: "huggingface.co:443: down")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="not in the local Hugging Face caches"):
        get_task("arc_challenge").load("eval")
    (tmp_path / "allenai___ai2_arc").mkdir()
    assert len(get_task("arc_challenge").load("eval")) == 2
    assert hub == [("allenai/ai2_arc", "ARC-Challenge", "validation")]


def test_arc_from_hub(hub):
    task = get_task("arc_challenge")
    ex = task.load("eval")
    assert hub == [("allenai/ai2_arc", "ARC-Challenge", "validation")]
    assert [e.label for e in ex] == [1, 1]
    assert ex[0].choices == ("rock", "air", "ice")
    assert (
        task.render_prompt(ex[0]) == "Question: Which is a gas?\nA) rock\nB) air\nC) ice\nAnswer:"
    )


def test_openbookqa_from_hub(hub):
    ex = get_task("openbookqa").load("train")
    assert hub == [("allenai/openbookqa", "main", "train")]
    assert (ex[0].id, ex[0].question, ex[0].label) == ("7-1", "The sun is a", 0)


def test_winogrande_train_s_maps_to_config(hub):
    ex = get_task("winogrande_s").load("train")
    assert hub == [("allenai/winogrande", "winogrande_s", "train")]
    assert (ex[0].choices, ex[0].label) == (("Ann", "Bo"), 0)


def test_boolq_from_hub_true_is_true(hub):
    task = get_task("boolq")
    ex = task.load("train")
    assert hub == [("google/boolq", None, "train")]
    assert [e.choices[e.label] for e in ex] == ["True", "False"]
    assert task.render_prompt(ex[0]) == (
        "Passage: Water is wet.\nQuestion: is water wet?\nTrue or False?\nAnswer:"
    )


def test_mmlu_from_hub(hub):
    ex = get_task("mmlu:college_physics").load("eval")
    assert hub == [("cais/mmlu", "college_physics", "test")]
    assert (ex[0].label, ex[0].choices[3]) == (3, "c")


def test_hub_bad_row_names_dataset_and_row(hub):
    with pytest.raises(
        DataError, match=r"cais/mmlu \(college_physics\) split 'dev', row 1: answer 5"
    ):
        get_task("mmlu:college_physics").load("train")


def test_hub_failure_is_a_data_error(hub):
    with pytest.raises(
        DataError, match=r"could not load .*allenai/ai2_arc.*'test'.*BLOB_LORA_DATA"
    ):
        get_task("arc_challenge").load("test")
