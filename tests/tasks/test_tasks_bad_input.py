"""Malformed records give a DataError naming the file, the 1-based line and the problem."""

from __future__ import annotations

import gzip
import json

import pytest

from blob_lora.tasks import Scoring, get_task
from blob_lora.utils.errors import DataError

GOOD = {"question": "Q?", "choices": ["a", "b", "c"], "answer": 1}


def _byo(tmp_path, bad_line: str, line_no: int = 3):
    lines = [json.dumps(GOOD)] * (line_no - 1) + [bad_line, json.dumps(GOOD)]
    (tmp_path / "validation.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "validation.jsonl"


@pytest.mark.parametrize(
    "bad, problem",
    [
        # the brace missing at the end of the line: its column, not column 1 of the newline
        ('{"question": "Q?", "choices": ["a", "b"], "answer": 1', "delimiter at column 54)"),
        ('["not", "an", "object"]', "expected a JSON object, got list"),
        ('{"choices": ["a", "b"], "answer": 0}', "missing field 'question'"),
        ('{"question": "Q?", "choices": ["a", "b"], "answer": 2}', "answer 2 is out of range"),
        (
            '{"question": "Q?", "choices": ["a", "b"], "answer": "C"}',
            "'C' is option 2 (0-based), but the row has 2 options (A-B)",
        ),
        (
            '{"question": "Q?", "choices": ["yes", "no"], "answer": "no"}',
            "it is the text of option 1: write 1",
        ),
        (  # a one-letter text past the options' letters: the text is the likelier meaning
            '{"question": "Q?", "choices": ["x", "y", "z"], "answer": "y"}',
            "the row has 3 options (A-C); it is the text of option 1: write 1",
        ),
        (
            '{"question": "Q?", "choices": ["B", "A"], "answer": "A"}',
            "'A' is ambiguous: letter A is option 0, but option 1's text is 'A'",
        ),
        ('{"question": "Q?", "choices": ["a"], "answer": 0}', "at least 2 options, got 1"),
        ('{"question": "Q?", "choices": "a b", "answer": 0}', "'choices' must be list, got str"),
        ('{"question": "Q?", "choices": ["a", 3], "answer": 0}', "choices[1] must be str"),
        ('{"question": 7, "choices": ["a", "b"], "answer": 0}', "'question' must be str"),
        ('{"question": "Q?", "choices": ["a", "b"], "answer": true}', "'answer' must be int"),
        ('{"question": "Q?", "choices": ["a", "b"], "answer": "maybe"}', "neither a 0-based"),
        ('{"question": "Q?", "choices": ["a", " "], "answer": 0}', "choices[1] is empty"),
        # a near miss of a field's name: the optional context would be dropped silently
        (
            '{"question": "Q?", "choices": ["a", "b"], "answer": 0, "contxt": "C."}',
            "field 'contxt' is not one this schema reads; did you mean 'context'?",
        ),
        ('{"Question": "Q?", "choices": ["a", "b"], "answer": 0}', "did you mean 'question'?"),
        ('{"question": "Q?", "choice": ["a", "b"], "answer": 0}', "did you mean 'choices'?"),
        ('{"question": "Q?", "choices": ["a", "b"], "answers": 0}', "did you mean 'answer'?"),
    ],
)
def test_byo_bad_record(tmp_path, bad, problem):
    path = _byo(tmp_path, bad)
    with pytest.raises(DataError) as err:
        get_task(str(tmp_path))
    msg = str(err.value)
    assert msg.startswith(f"{path}, line 3: ")
    assert problem in msg


def test_own_metadata_fields_are_kept_out_of_the_way(tmp_path):
    """Extra fields of the user's own (even ones a little like a schema field, or like a
    present one) are not near misses: the rows load, their context read."""
    row = {
        **GOOD,
        "idx": 7,
        "qid": "q7",
        "question_id": "x",
        "context_id": 3,
        "content": "a field of the user's own",
        "answered": True,
        "contexts": ["ignored: context is present"],
        "context": "C.",
        "source": "mine",
    }
    (tmp_path / "validation.jsonl").write_text(json.dumps(row) + "\n")
    (ex,) = get_task(str(tmp_path)).load("eval")
    assert ex.context == "C." and ex.id == "validation-1"


def test_a_repeated_id_names_both_lines(tmp_path):
    row = json.dumps({**GOOD, "id": "x"})
    path = tmp_path / "validation.jsonl"
    path.write_text("\n".join([row, json.dumps(GOOD), row]) + "\n")
    with pytest.raises(DataError, match=rf"{path}, line 3: id 'x' repeats line 1's"):
        get_task(str(tmp_path))


def test_too_many_options(tmp_path):
    rec = {"question": "Q?", "choices": [str(i) for i in range(27)], "answer": 0}
    path = _byo(tmp_path, json.dumps(rec), line_no=1)
    with pytest.raises(DataError, match=rf"{path}, line 1: has 27 options; at most 26"):
        get_task(str(tmp_path))


def test_bad_utf8_line(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"question": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{path}, line 2: not valid UTF-8"):
        get_task(str(tmp_path))


def _arc_root(tmp_path, record, gz=False):
    folder = tmp_path / "arc_easy"
    folder.mkdir()
    good = {
        "id": "ok",
        "question": {"stem": "s", "choices": [{"text": "x", "label": "A"}] * 2},
        "answerKey": "A",
    }
    text = json.dumps(good) + "\n" + json.dumps(record) + "\n"
    if gz:
        path = folder / "validation.jsonl.gz"
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path = folder / "validation.jsonl"
        path.write_text(text)
    return path


def test_arc_answer_key_not_a_choice(tmp_path):
    rec = {
        "id": "bad",
        "question": {
            "stem": "s",
            "choices": [{"text": "x", "label": "1"}, {"text": "y", "label": "2"}],
        },
        "answerKey": "C",
    }
    path = _arc_root(tmp_path, rec, gz=True)
    task = get_task("arc_easy", tmp_path)
    with pytest.raises(DataError) as err:
        task.load("validation")
    msg = str(err.value)
    assert f"{path}, line 2: answerKey 'C' is not one of the choice labels ['1', '2']" in msg
    assert msg.startswith("task 'arc_easy': ")


def test_arc_missing_nested_field(tmp_path):
    rec = {"id": "bad", "question": {"choices": []}, "answerKey": "A"}
    path = _arc_root(tmp_path, rec)
    with pytest.raises(DataError, match=rf"{path}, line 2: missing field 'question.stem'"):
        get_task("arc_easy", tmp_path).load("eval")


def test_winogrande_unlabelled(tmp_path):
    (tmp_path / "winogrande").mkdir()
    rec = {"qID": "q", "sentence": "_ x", "option1": "a", "option2": "b", "answer": ""}
    (tmp_path / "winogrande" / "validation.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=r"line 1: answer must be '1' or '2', got ''"):
        get_task("winogrande_s", tmp_path).load("eval")


def test_boolq_answer_must_be_bool(tmp_path):
    (tmp_path / "boolq").mkdir()
    rec = {"question": "q", "passage": "p", "answer": "yes"}
    (tmp_path / "boolq" / "validation.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'answer' must be bool, got str"):
        get_task("boolq", tmp_path).load("eval")


def test_missing_split_lists_paths(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    with pytest.raises(DataError) as err:
        get_task("arc_easy", tmp_path).load("eval")
    msg = str(err.value)
    assert str(tmp_path / "arc_easy" / "validation.jsonl") in msg
    assert str(tmp_path / "arc_easy" / "validation.jsonl.gz") in msg


def test_byo_without_eval_split(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"no evaluation split; looked for .*validation\.jsonl"):
        get_task(str(tmp_path))


def test_an_unlabelled_test_file_beside_validation_is_not_in_the_way(tmp_path):
    """train / validation / an unlabelled test.jsonl is a common layout: the task loads (the
    test file's option count still counts), and scoring the test split is refused with its
    file and line. Where test.jsonl is the evaluation split, its answers stay required."""
    unlabelled = {"question": "Q?", "choices": ["a", "b", "c", "d", "e"]}
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(unlabelled) + "\n")
    task = get_task(str(tmp_path))
    assert task.eval_split == "validation" and task.n_options == 5
    assert [ex.label for ex in task.load("eval")] == [1]
    with pytest.raises(DataError, match=r"test\.jsonl, line 1: missing field 'answer'"):
        task.load("test")
    with pytest.raises(DataError, match=r"test\.jsonl, line 1: .*'choices' must be list"):
        (tmp_path / "test.jsonl").write_text('{"question": "Q?", "choices": "a b"}\n')
        get_task(str(tmp_path))  # the rest of the record is still checked
    (tmp_path / "validation.jsonl").unlink()
    (tmp_path / "test.jsonl").write_text(json.dumps(unlabelled) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl, line 1: missing field 'answer'"):
        get_task(str(tmp_path))


def test_an_extra_split_with_more_options_says_how_to_score_it(tmp_path):
    """The option count (and so the answer letters) comes from train/validation/test; a split
    of another name with more options is refused, saying what to do instead."""
    (tmp_path / "validation.jsonl").write_text(json.dumps(GOOD) + "\n")
    wide = {"question": "Q?", "choices": list("abcde"), "answer": 4}
    (tmp_path / "extra.jsonl").write_text(json.dumps(wide) + "\n")
    with pytest.raises(
        DataError, match="5 options, more than the task's 3 .*folder of its own"
    ) as err:
        get_task(str(tmp_path)).load("extra")
    assert str(err.value).endswith(f"({tmp_path / 'extra.jsonl'}, line 1)")


def test_a_prompt_too_long_to_fit_names_its_file(tmp_path):
    """Options longer than --max-length are found when the split is tokenised, after it was
    read: the error named the task and the example, not the file they came from."""
    from blob_lora.tasks.dataset import MCDataset
    from blob_lora.utils.errors import OverlongError
    from tests.factories import tiny_tokenizer

    long_row = {"id": "longopt", "question": "Q?", "choices": ["a" * 300, "b"], "answer": 0}
    (tmp_path / "validation.jsonl").write_text(
        json.dumps(GOOD) + "\n\n" + json.dumps(long_row)  # the blank line 2 counts
    )
    task = get_task(str(tmp_path))
    for scoring in ("letter", "cloze"):
        with pytest.raises(OverlongError) as err:
            MCDataset(task, "eval", tiny_tokenizer(), 64, scoring=Scoring.of(scoring))
        assert "example 'longopt'" in str(err.value)
        assert str(err.value).endswith(f"({tmp_path / 'validation.jsonl'}, line 3)")
        assert err.value.example_id == "longopt"  # still the error a caller may leave out
        assert err.value.line == 3
    # gzipped, with Windows line endings: the same line of the same (named) file
    text = (tmp_path / "validation.jsonl").read_text().replace("\n", "\r\n")
    (tmp_path / "validation.jsonl").unlink()
    with gzip.open(tmp_path / "validation.jsonl.gz", "wt", newline="") as f:
        f.write(text)
    with pytest.raises(OverlongError) as err:
        MCDataset(get_task(str(tmp_path)), "eval", tiny_tokenizer(), 64)
    assert str(err.value).endswith(f"({tmp_path / 'validation.jsonl.gz'}, line 3)")


def test_a_question_that_cannot_be_scored_names_its_file_and_line(tmp_path):
    """The other errors found when a split is tokenised carry the line as well: a local
    WinoGrande sentence without its blank, which partial scoring needs (letter scoring does
    not, so reading the file cannot refuse it)."""
    from blob_lora.tasks.dataset import MCDataset
    from blob_lora.utils.errors import ExampleError
    from tests.factories import tiny_tokenizer

    row = {"sentence": "A _ fell.", "option1": "cup", "option2": "pot", "answer": "1"}
    folder = tmp_path / "winogrande"
    folder.mkdir()
    no_blank = {**row, "qID": "w2", "sentence": "No blank."}
    (folder / "validation.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(no_blank))
    task = get_task("winogrande_s", data_root=tmp_path)
    MCDataset(task, "eval", tiny_tokenizer(), 256)  # letter scoring reads it
    with pytest.raises(ExampleError, match="'w2': a WinoGrande sentence needs exactly") as err:
        MCDataset(task, "eval", tiny_tokenizer(), 256, scoring=Scoring.of("cloze"))
    assert str(err.value).endswith(f"({folder / 'validation.jsonl'}, line 2)")
