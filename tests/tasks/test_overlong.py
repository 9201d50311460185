"""Questions that cannot fit the prompt budget even with their passage and question cut:
``OverlongError`` names the exact length they need (both scorings), and
``fitting_examples`` sets them apart from the others without hiding any other bad record."""

from __future__ import annotations

import pytest

from blob_lora.tasks import MCExample, get_task
from blob_lora.tasks.dataset import encode_split, fitting_examples
from blob_lora.tasks.scoring import LETTER, Scoring
from blob_lora.utils.errors import DataError, OverlongError
from tests.factories import tiny_task_collection, tiny_tokenizer

CLOZE = Scoring("cloze", "none")
LONG = MCExample("long", "Which one of these?", ("a very long option " * 4, "b", "c"), 0)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tiny_task_collection(tmp_path_factory.mktemp("tasks"), n_tasks=1, n_questions=3)
    return get_task(str(root / "task0"))


@pytest.mark.parametrize("scoring", [LETTER, CLOZE], ids=["letter", "cloze"])
def test_an_overlong_question_names_the_exact_length_it_needs(task, scoring) -> None:
    tok = tiny_tokenizer()
    with pytest.raises(OverlongError) as info:
        encode_split(task, [LONG], tok, 20, scoring)
    need = info.value.needed
    assert info.value.example_id == "long"
    assert f"needs {need} tokens" in str(info.value) and need > 20
    # the smallest budget that fits: all of the question cut, nothing of the options
    short = MCExample("short", "Which?", ("x", "y"), 1)
    enc = encode_split(task, [short, LONG, short], tok, need, scoring)
    assert enc.truncated == [False, True, False] and enc.n_truncated == 1
    with pytest.raises(OverlongError):
        encode_split(task, [LONG], tok, need - 1, scoring)


@pytest.mark.parametrize("scoring", [LETTER, CLOZE], ids=["letter", "cloze"])
def test_fitting_examples_keeps_the_others_in_order_and_lists_the_overlong(task, scoring):
    tok = tiny_tokenizer()
    short = [MCExample(f"q{i}", f"Question {i}?", ("x", "y"), i % 2) for i in range(3)]
    examples = [short[0], LONG, short[1], short[2]]
    with pytest.raises(OverlongError):
        encode_split(task, [LONG], tok, 40, scoring)
    kept, overlong = fitting_examples(task, examples, tok, 40, scoring)
    assert [ex.id for ex in kept] == ["q0", "q1", "q2"]
    assert list(overlong) == ["long"] and overlong["long"] > 40
    assert fitting_examples(task, short, tok, 40, scoring) == (short, {})


def test_fitting_examples_still_raises_on_a_malformed_question(task) -> None:
    """A question whose option has no text to score is bad data, not a long question: it is
    not left out quietly."""
    bad = MCExample("bad", "Which?", ("x", " "), 0)
    with pytest.raises(DataError, match="option 1 has no text to score") as info:
        fitting_examples(task, [LONG, bad], tiny_tokenizer(), 40, CLOZE)
    assert not isinstance(info.value, OverlongError)
