"""Answer-token ids for real tokenizer conventions, and option-logit masking."""

from __future__ import annotations

import pytest
import torch

from blob_lora.tasks import (
    MCCollator,
    MCDataset,
    get_task,
    option_logits,
    option_token_ids,
)
from blob_lora.utils.errors import ConfigError


def test_smollm2_letters_are_leading_space_tokens(data_root, smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = option_token_ids(tok, get_task("arc_challenge", data_root))
    assert ids.dtype == torch.long
    assert ids.tolist() == [330, 389, 340, 422, 414]
    assert tok.convert_ids_to_tokens(ids.tolist()) == ["ĠA", "ĠB", "ĠC", "ĠD", "ĠE"]
    # not the bare letter a naive convert_tokens_to_ids("A") would give
    assert tok.convert_tokens_to_ids("A") not in ids.tolist()


def test_smollm2_boolq_words(data_root, smollm2_tokenizer):
    ids = option_token_ids(smollm2_tokenizer, get_task("boolq", data_root))
    assert smollm2_tokenizer.convert_ids_to_tokens(ids.tolist()) == ["ĠTrue", "ĠFalse"]
    assert ids.tolist() == [3635, 4178]


def test_llama_style_letters_are_metaspace_pieces(data_root, llama_tokenizer):
    tok = llama_tokenizer
    ids = option_token_ids(tok, get_task("arc_easy", data_root))
    assert tok.convert_ids_to_tokens(ids.tolist()) == ["▁A", "▁B", "▁C", "▁D", "▁E"]
    assert tok.convert_tokens_to_ids("A") not in ids.tolist()
    boolq = option_token_ids(tok, get_task("boolq", data_root))
    assert tok.convert_ids_to_tokens(boolq.tolist()) == ["▁True", "▁False"]


def test_letter_that_is_not_one_token_is_an_error(data_root, make_llama_tokenizer):
    tok = make_llama_tokenizer(letters="ABCD")  # no "▁E" piece: " E" -> "▁", "E"
    with pytest.raises(ConfigError, match=r"option 'E' does not map to one token.*'▁', 'E'"):
        option_token_ids(tok, get_task("arc_challenge", data_root))
    # four-option tasks are fine with the same tokenizer
    assert len(option_token_ids(tok, get_task("openbookqa", data_root))) == 4


def test_option_logits_masks_three_option_arc_question(data_root, smollm2_tokenizer):
    tok = smollm2_tokenizer
    task = get_task("arc_challenge", data_root)
    ds = MCDataset(task, "validation[:0]", tok, 128)  # cheap warm-up of the API on no data
    assert len(ds) == 0
    ds = MCDataset(task, "validation", tok, 256)
    idx = ds.example_ids.index("NYSEDREGENTS_2014_4_4")  # 3 options: gas / liquid / solid
    four = ds.example_ids.index("Mercury_SC_407695")  # 4 options
    batch = MCCollator(tok.eos_token_id, task.n_options)([ds[idx], ds[four]])
    assert batch["option_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 4 + [False]]
    assert batch["labels"][0].item() == 0

    ids = option_token_ids(tok, task)
    torch.manual_seed(0)
    last = torch.randn(2, len(tok))
    logits = option_logits(last, ids, batch["option_mask"])
    assert logits.shape == (2, 5)
    assert torch.equal(logits[0, :3], last[0, ids[:3]])
    assert torch.isneginf(logits[0, 3:]).all()
    probs = logits.softmax(-1)
    assert probs[0, 3:].tolist() == [0.0, 0.0]
    assert probs[0].sum().item() == pytest.approx(1.0)
    # a (B, 1, V) output from logits_to_keep=1 is accepted as well
    assert torch.equal(option_logits(last[:, None, :], ids, batch["option_mask"]), logits)


def test_option_logits_shape_checks():
    with pytest.raises(ValueError, match="option_mask shape"):
        option_logits(torch.zeros(2, 10), torch.tensor([1, 2, 3]), torch.ones(2, 2, dtype=bool))
