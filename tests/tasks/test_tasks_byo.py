"""Bring-your-own JSONL folder, end to end: task, dataset, collation, scoring tensors."""

from __future__ import annotations

import dataclasses
import json

import torch

from blob_lora.tasks import MCCollator, MCDataset, get_task, option_logits, option_token_ids


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_byo_end_to_end(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    folder = tmp_path / "my_task"
    folder.mkdir()
    _write(
        folder / "train.jsonl",
        [
            {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
            {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": "B"},
        ],
    )
    _write(
        folder / "validation.jsonl",
        [
            {"id": "v1", "question": "Sky colour?", "choices": ["blue", "red"], "answer": "a"},
            {
                "id": "v2",
                "context": "Tom has 3 apples and eats one.",
                "question": "How many are left?",
                "choices": ["1", "2", "3", "4"],
                "answer": 1,
            },
        ],
    )
    task = get_task(str(folder))
    assert (task.train_split, task.eval_split) == ("train", "validation")
    assert task.n_options == 4 and task.option_letters == ("A", "B", "C", "D")

    train = task.load("train")
    assert [ex.label for ex in train] == [1, 1]
    assert train[0].id == "train-1"
    ev = task.load("eval")
    assert [ex.id for ex in ev] == ["v1", "v2"]
    assert task.render_prompt(ev[1]) == (
        "Context: Tom has 3 apples and eats one.\n"
        "Question: How many are left?\nA) 1\nB) 2\nC) 3\nD) 4\nAnswer:"
    )

    ds = MCDataset(task, "eval", tok, 128)
    batch = MCCollator(tok.eos_token_id, task.n_options)([ds[0], ds[1]])
    assert batch["labels"].tolist() == [0, 1]
    assert batch["option_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"][0].sum().item() == len(ds[0]["input_ids"])

    ids = option_token_ids(tok, task)
    logits = option_logits(torch.zeros(2, len(tok)), ids, batch["option_mask"])
    assert logits.softmax(-1)[0].tolist() == [0.5, 0.5, 0.0, 0.0]


def test_byo_test_split_and_no_train(tmp_path):
    _write(tmp_path / "test.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": 0}])
    task = get_task(tmp_path)
    assert (task.train_split, task.eval_split, task.n_options) == (None, "test", 2)
    assert len(task.load("eval")) == 1


def test_examples_keep_their_line_in_the_file_and_compare_without_it(tmp_path):
    """``MCExample.line`` is the question's line in its file (blank lines count, as an editor
    counts them), for errors found after reading; it is where a question was, not what it is."""
    (tmp_path / "validation.jsonl").write_text(
        '{"question": "A?", "choices": ["x", "y"], "answer": 0}\n\n'
        '{"id": "b", "question": "B?", "choices": ["x", "y"], "answer": 1}\n'
    )
    examples = get_task(str(tmp_path)).load("eval")
    assert [(ex.id, ex.line) for ex in examples] == [("validation-1", 1), ("b", 3)]
    moved = dataclasses.replace(examples[1], line=40)
    assert moved == examples[1] and hash(moved) == hash(examples[1])
    assert "line" not in repr(moved)
