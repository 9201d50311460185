"""Tokenised datasets: collation, truncation that spares options and cue, caches, bucketing."""

from __future__ import annotations

import json

import pytest
import torch

from blob_lora.tasks import (
    MCCollator,
    MCDataset,
    MCExample,
    encode_examples,
    get_task,
    length_bucketed_sampler,
)
from blob_lora.tasks import dataset as dataset_mod
from blob_lora.utils.errors import ConfigError, DataError


def test_collator_left_pads(data_root, smollm2_tokenizer):
    tok = smollm2_tokenizer
    task = get_task("winogrande_s", data_root)
    ds = MCDataset(task, "validation[:4]", tok, 128)
    assert len(ds) == 4
    items = [ds[i] for i in range(4)]
    assert all(it["n_options"] == 2 for it in items)
    batch = MCCollator(tok.eos_token_id, task.n_options)(items)
    t = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == (4, t) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == (4, t)
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (4,)
    assert batch["option_mask"].dtype == torch.bool and batch["option_mask"].all()
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        assert batch["input_ids"][i, t - n :].tolist() == it["input_ids"]
        assert batch["attention_mask"][i].tolist() == [0] * (t - n) + [1] * n
        assert (batch["input_ids"][i, : t - n] == tok.eos_token_id).all()
        # every row ends with the cue
        assert tok.decode(batch["input_ids"][i, -3:]).endswith("\nAnswer:")
    assert batch["labels"].tolist() == [it["label"] for it in items]


def test_prompt_tokens_match_plain_tokenisation(data_root, smollm2_tokenizer):
    tok = smollm2_tokenizer
    task = get_task("arc_easy", data_root)
    ex = task.load("validation")[0]
    ids, cut = encode_examples(task, [ex], tok, 512)
    assert cut == [False]
    assert ids[0] == tok(task.render_prompt(ex), add_special_tokens=False)["input_ids"]


def test_llama_style_bos_is_prepended(data_root, llama_tokenizer):
    task = get_task("arc_easy", data_root)
    ex = MCExample("x", "Which the?", ("A", "B"), 0)
    ids, _ = encode_examples(task, [ex], llama_tokenizer, 512)
    assert ids[0][0] == llama_tokenizer.bos_token_id
    assert ids[0].count(llama_tokenizer.bos_token_id) == 1
    assert llama_tokenizer.convert_ids_to_tokens(ids[0][-2:]) == ["Answer", ":"]


def test_boolq_truncation_cuts_the_passage_end(data_root, smollm2_tokenizer):
    tok = smollm2_tokenizer
    task = get_task("boolq", data_root)
    ex = task.load("validation")[0]  # a long passage
    full, _ = encode_examples(task, [ex], tok, 4096)
    ids, cut = encode_examples(task, [ex], tok, 96)
    assert cut == [True] and len(ids[0]) == 96 < len(full[0])
    text = tok.decode(ids[0])
    assert text.startswith("Passage: Ethanol fuel -- All biomass goes through")
    assert text.endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nTrue or False?\nAnswer:"
    )
    assert "producing gasoline" not in text  # the passage's last words were dropped
    # the kept tail is token-for-token the tail of the untruncated prompt
    assert ids[0][-20:] == full[0][-20:]


def test_question_truncation_keeps_options_and_cue(data_root, smollm2_tokenizer):
    tok = smollm2_tokenizer
    task = get_task("arc_easy", data_root)
    long_q = "word " * 200 + "Which gas do plants take in?"
    ex = MCExample("long", long_q, ("oxygen", "carbon dioxide", "helium"), 1)
    ids, cut = encode_examples(task, [ex], tok, 40)
    assert cut == [True] and len(ids[0]) == 40
    text = tok.decode(ids[0])
    assert text.startswith("Question:")
    assert text.endswith(
        "Which gas do plants take in?\nA) oxygen\nB) carbon dioxide\nC) helium\nAnswer:"
    )


def test_prompt_that_cannot_fit_is_a_data_error(data_root, smollm2_tokenizer):
    task = get_task("arc_easy", data_root)
    ex = MCExample("tiny", "Q?", ("a long option " * 20, "b"), 0)
    with pytest.raises(DataError, match=r"example 'tiny'.*never cut.*max_length=16"):
        encode_examples(task, [ex], smollm2_tokenizer, 16)


def test_in_process_and_disk_cache(data_root, smollm2_tokenizer, tmp_path, monkeypatch):
    tok = smollm2_tokenizer
    task = get_task("arc_challenge", data_root)
    first = MCDataset(task, "validation[:20]", tok, 64, cache_dir=tmp_path)
    assert first.cache_hit is None
    files = list((tmp_path / "tokenized").glob("*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["key"]["max_length"] == 64

    # neither a hit from memory nor from disk tokenises or reads the data again
    def boom(*a, **k):
        raise AssertionError("re-tokenised")

    monkeypatch.setattr(dataset_mod, "encode_examples", boom)
    again = MCDataset(task, "validation[:20]", tok, 64, cache_dir=tmp_path)
    assert again.cache_hit == "memory"
    dataset_mod.clear_cache()
    from_disk = MCDataset(task, "validation[:20]", tok, 64, cache_dir=tmp_path)
    assert from_disk.cache_hit == "disk"
    assert [from_disk[i] for i in range(20)] == [first[i] for i in range(20)]
    assert from_disk.example_ids == first.example_ids
    assert from_disk.truncated == first.truncated and len(first.truncated) == 20
    # a file without the per-example flags (a count, as format 1 held) is rebuilt, not misread
    obj = json.loads(files[0].read_text())
    obj["n_truncated"] = first.n_truncated
    del obj["truncated"]
    files[0].write_text(json.dumps(obj))
    dataset_mod.clear_cache()
    monkeypatch.undo()
    rebuilt = MCDataset(task, "validation[:20]", tok, 64, cache_dir=tmp_path)
    assert rebuilt.cache_hit is None and rebuilt.truncated == first.truncated
    assert "truncated" in json.loads(files[0].read_text())
    monkeypatch.setattr(dataset_mod, "encode_examples", boom)
    # another max_length is another cache entry
    with pytest.raises(AssertionError, match="re-tokenised"):
        MCDataset(task, "validation[:20]", tok, 65, cache_dir=tmp_path)


def test_length_bucketed_sampler_is_seeded_and_complete():
    lengths = [5, 50, 7, 42, 9, 11, 60, 3, 20, 21, 22]
    s = length_bucketed_sampler(lengths, 3, seed=1, pool_factor=2)
    batches = list(s)
    assert len(batches) == len(s) == 4
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert list(length_bucketed_sampler(lengths, 3, seed=1, pool_factor=2)) == batches
    s.set_epoch(1)
    assert list(s) != batches
    for b in batches:  # each batch is sorted by length within its pool
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    fixed = list(length_bucketed_sampler(lengths, 4, shuffle=False, pool_factor=10))
    assert [lengths[i] for b in fixed for i in b] == sorted(lengths)
    assert len(list(length_bucketed_sampler(lengths, 3, drop_last=True))) == 3


def test_llama_style_truncation_keeps_bos_options_and_cue(data_root, llama_tokenizer):
    tok = llama_tokenizer
    task = get_task("arc_easy", data_root)
    ex = MCExample("l", "the " * 50 + "Which?", ("A", "B"), 0)
    full, _ = encode_examples(task, [ex], tok, 4096)
    ids, cut = encode_examples(task, [ex], tok, 30)
    assert cut == [True] and len(ids[0]) == 30
    assert ids[0][0] == tok.bos_token_id
    assert ids[0][-16:] == full[0][-16:]  # "▁Which ? \n A ) ▁A \n B ) ▁B \n Answer :" kept
    assert tok.convert_ids_to_tokens(ids[0][1:3]) == ["▁Question", ":"]


def test_datasets_and_tasks_pickle_for_worker_processes(data_root, smollm2_tokenizer):
    import pickle

    for name, split in [("mmlu:college_physics", "dev"), ("winogrande_s", "validation[:3]")]:
        ds = MCDataset(get_task(name, data_root), split, smollm2_tokenizer, 128)
        clone = pickle.loads(pickle.dumps(ds))
        assert clone[0] == ds[0] and len(clone) == len(ds)
        assert clone.task.load(split)[0] == ds.task.load(split)[0]


def test_data_fingerprint_follows_content_not_path_or_timestamps(tmp_path):
    """Shared data folders are re-synced with fresh mtimes: caches must still be found."""
    import os
    import shutil

    for name in ("a", "b"):
        (tmp_path / name / "arc_easy").mkdir(parents=True)
    src = tmp_path / "a" / "arc_easy" / "validation.jsonl"
    rows = [
        {"id": f"q{i}", "question": f"Question {i}?", "choices": ["x", "y", "z"], "label": 1}
        for i in range(3)
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    copy = tmp_path / "b" / "arc_easy" / "validation.jsonl"
    shutil.copyfile(src, copy)
    os.utime(copy, ns=(10**18, 10**18))  # another timestamp, another folder, same bytes

    def fp(root):
        return get_task("arc_easy", str(root)).source_fingerprint("validation")

    assert fp(tmp_path / "a") == fp(tmp_path / "b")
    copy.write_text(copy.read_text().replace("Question 2", "Question 9"))
    os.utime(copy, ns=(10**18, 10**18))  # same size and mtime as before the edit
    assert fp(tmp_path / "a") != fp(tmp_path / "b")


def test_length_sorted_batches_longest_first_ties_in_order() -> None:
    from blob_lora.tasks import length_sorted_batches

    assert length_sorted_batches([3, 5, 1, 5, 2], 2) == [[1, 3], [0, 4], [2]]
    assert length_sorted_batches([], 4) == []
    batches = length_sorted_batches([7, 2, 9, 4, 4, 1, 8], 3)
    assert sorted(i for b in batches for i in b) == list(range(7))  # every index once
    assert [len(b) for b in batches] == [3, 3, 1]
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        length_sorted_batches([1, 2], 0)
