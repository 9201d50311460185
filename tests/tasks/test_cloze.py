"""Choice-likelihood (cloze) scoring: packed sequences score every option exactly as a separate
``prompt + option`` sequence would, WinoGrande's partial scoring, one weight sample per question."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from blob_lora.models.forward import (
    AttentionSpans,
    answer_logits,
    attention_spans,
    cloze_attention_mask,
)
from blob_lora.tasks import MCExample, Scoring
from blob_lora.tasks.dataset import (
    MCCollator,
    encode_cloze_examples,
    encode_split,
    special_prefix,
)
from blob_lora.tasks.prompts import prompt_segments
from blob_lora.utils.errors import ConfigError, DataError
from tests.factories import tiny_base, tiny_tokenizer

MC = SimpleNamespace(name="mc", style="mc")
WG = SimpleNamespace(name="wg", style="winogrande")
BOOLQ = SimpleNamespace(name="bq", style="boolq")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _batch(task, examples, tok, n_options, length_norm="none", max_length=600):
    items, _ = encode_cloze_examples(task, examples, tok, max_length, length_norm)
    for it, ex in zip(items, examples, strict=True):
        it.update(label=ex.label, n_options=ex.n_options)
    return MCCollator(tok.pad_token_id, n_options)(items)


def _continuation_logprob(model, tok, prompt: str, continuation: str) -> tuple[float, int]:
    """By hand: sum of log p(token) over the tokens ``prompt + continuation`` adds to
    ``prompt``, from one unpadded forward of the whole text; and how many tokens that is."""
    pre = special_prefix(tok)
    p = pre + tok(prompt, add_special_tokens=False)["input_ids"]
    f = pre + tok(prompt + continuation, add_special_tokens=False)["input_ids"]
    assert f[: len(p)] == p
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([f])).logits[0].double(), -1)
    return sum(float(logp[i - 1, f[i]]) for i in range(len(p), len(f))), len(f) - len(p)


EXAMPLES = [
    MCExample("a", "What is red?", ("apple", "sky", "grass"), 0),
    MCExample("b", "Which is cold?", ("ice", "fire here", "sun", "lava"), 0, context="Heat."),
]
PROMPTS = ["Question: What is red?\nAnswer:", "Context: Heat.\nQuestion: Which is cold?\nAnswer:"]


def _scores_match_by_hand(model, tok) -> torch.Tensor:
    """Score ``EXAMPLES`` packed; assert each option's score equals its log-likelihood by hand
    (:func:`_continuation_logprob`); the (2, 4) scores."""
    batch = _batch(MC, EXAMPLES, tok, 4)
    assert batch["position_ids"].max() >= 8  # longer than the windows and chunks used below
    with torch.no_grad():
        scores = answer_logits(model, batch, None)
    for b, (ex, prompt) in enumerate(zip(EXAMPLES, PROMPTS, strict=True)):
        for k, choice in enumerate(ex.choices):
            want, _ = _continuation_logprob(model, tok, prompt, " " + choice)
            assert scores[b, k].item() == pytest.approx(want, abs=2e-4)
    return scores


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cloze_scores_equal_per_option_log_likelihood_by_hand(tok, attn) -> None:
    model = tiny_base(tok, seed=3)
    model.config._attn_implementation = attn
    scores = _scores_match_by_hand(model, tok)
    assert scores[0, 3].item() == float("-inf")  # question a has 3 options


def _sliding_model(kind: str, tok, attn: str):
    """A random tiny model whose attention window or chunk (8 positions) is shorter than the
    prompts: every layer slides (Mistral), or full and sliding layers mixed (Qwen2 with
    ``use_sliding_window``: layer 0 full), or all of Gemma 3's layers slide by layer type, or
    Llama 4's chunked layers beside a full one."""
    import transformers as tf

    sizes = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, attn_implementation=attn,
    )  # fmt: skip
    config, model = {
        "mistral": (tf.MistralConfig(sliding_window=8, **sizes), tf.MistralForCausalLM),
        "qwen2": (
            tf.Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **sizes),
            tf.Qwen2ForCausalLM,
        ),
        "gemma3": (
            tf.Gemma3TextConfig(sliding_window=8, head_dim=8, **sizes),
            tf.Gemma3ForCausalLM,
        ),
        "llama4": (
            tf.Llama4TextConfig(
                attention_chunk_size=8,
                head_dim=8,
                intermediate_size_mlp=64,
                num_local_experts=2,
                **{**sizes, "num_hidden_layers": 4},
            ),
            tf.Llama4ForCausalLM,
        ),
    }[kind]
    torch.manual_seed(3)
    return model(config).eval()


@pytest.mark.parametrize(
    ("kind", "attn"),
    [
        ("mistral", "sdpa"),
        ("qwen2", "sdpa"),
        ("qwen2", "eager"),
        ("gemma3", "sdpa"),
        ("llama4", "sdpa"),
    ],
)  # the eager arm: the additive form of a mask per layer type
def test_cloze_scores_follow_the_models_sliding_window_or_chunks(tok, kind, attn) -> None:
    """A model given a ready 4-D mask applies no window or chunk of its own: the packed options
    must be cut by position, per layer type where kinds of layers mix (before: off by
    0.12-0.46 nats from the model's own forward of each option)."""
    _scores_match_by_hand(_sliding_model(kind, tok, attn), tok)


def test_attention_spans_of_a_model_and_its_layer_types(tok) -> None:
    assert attention_spans(tiny_base(tok)) is None
    assert attention_spans(_sliding_model("mistral", tok, "sdpa")) == AttentionSpans(8)
    spans = attention_spans(_sliding_model("qwen2", tok, "sdpa"))
    assert spans == AttentionSpans(8, None, ("full_attention",) + ("sliding_attention",) * 2)
    spans = attention_spans(_sliding_model("llama4", tok, "sdpa"))
    assert (spans.window, spans.chunk) == (None, 8)


def test_a_layer_type_cloze_cannot_mask_is_refused_when_the_window_cuts(tok) -> None:
    batch = _batch(MC, EXAMPLES, tok, 4)
    types = ("full_attention", "linear_attention", "sliding_attention")
    with pytest.raises(ConfigError, match=r"linear_attention.*--max-length of at most 8"):
        cloze_attention_mask(batch, "sdpa", torch.float32, AttentionSpans(8, None, types))
    wide = cloze_attention_mask(batch, "sdpa", torch.float32, AttentionSpans(4096, None, types))
    assert torch.equal(wide, cloze_attention_mask(batch, "sdpa", torch.float32))


@pytest.mark.parametrize("norm", ["token", "char"])
def test_length_normalisation_divides_by_scored_tokens_or_chars(tok, norm) -> None:
    model = tiny_base(tok, seed=3)
    batch = _batch(MC, EXAMPLES[:1], tok, 3, length_norm=norm)
    with torch.no_grad():
        scores = answer_logits(model, batch, None)
    for k, choice in enumerate(EXAMPLES[0].choices):
        total, n_tokens = _continuation_logprob(model, tok, PROMPTS[0], " " + choice)
        divisor = n_tokens if norm == "token" else len(" " + choice)
        assert scores[0, k].item() == pytest.approx(total / divisor, abs=2e-5)


def test_winogrande_partial_scoring_scores_the_words_after_the_blank(tok) -> None:
    ex = MCExample("w", "The cup fell because _ was heavy.", ("the cup", "the table"), 0)
    model = tiny_base(tok, seed=4)
    batch = _batch(WG, [ex], tok, 2)
    with torch.no_grad():
        scores = answer_logits(model, batch, None)
    for k, option in enumerate(ex.choices):
        want, _ = _continuation_logprob(model, tok, f"The cup fell because {option}", " was heavy.")
        assert scores[0, k].item() == pytest.approx(want, abs=2e-4)
    # the scored tokens spell " was heavy." once per option; the options' words are read only
    items, _ = encode_cloze_examples(WG, [ex], tok, 600)
    item = items[0]
    for k in range(2):
        scored = [
            t for t, o in zip(item["input_ids"], item["target_option"], strict=True) if o == k
        ]
        assert tok.decode(scored).strip() == "was heavy."


def test_winogrande_needs_one_blank(tok) -> None:
    ex = MCExample("w", "No blank here.", ("a", "b"), 0)
    with pytest.raises(DataError, match="exactly one blank"):
        encode_cloze_examples(WG, [ex], tok, 600)


def test_boolq_scores_yes_and_no_after_the_passage(tok) -> None:
    ex = MCExample("q", "is it cold", ("True", "False"), 1, context="Ice is cold.")
    model = tiny_base(tok, seed=5)
    batch = _batch(BOOLQ, [ex], tok, 2)
    with torch.no_grad():
        scores = answer_logits(model, batch, None)
    prompt = "Passage: Ice is cold.\nQuestion: is it cold?\nAnswer:"
    for k, word in enumerate([" yes", " no"]):
        want, _ = _continuation_logprob(model, tok, prompt, word)
        assert scores[0, k].item() == pytest.approx(want, abs=2e-4)


def test_truncation_cuts_the_shared_question_never_the_options(tok) -> None:
    long_q = "word " * 60
    ex = MCExample("t", long_q, ("short", "other"), 0)
    full, _ = encode_cloze_examples(MC, [ex], tok, 2000)
    items, cut = encode_cloze_examples(MC, [ex], tok, 200)
    assert cut == [True] and len(items[0]["input_ids"]) <= 200 < len(full[0]["input_ids"])
    # the options' tokens (branch > 0) are kept whole
    assert [t for t, b in zip(items[0]["input_ids"], items[0]["branch"], strict=True) if b] == [
        t for t, b in zip(full[0]["input_ids"], full[0]["branch"], strict=True) if b
    ]
    with pytest.raises(DataError, match="options are never cut"):
        encode_cloze_examples(MC, [ex], tok, 12)


def test_scoring_settings_are_checked() -> None:
    assert Scoring("cloze", "char").describe() == "cloze (char)"
    with pytest.raises(ConfigError, match="--scoring"):
        Scoring("words")
    with pytest.raises(ConfigError, match="--length-norm"):
        Scoring("cloze", "bytes")
    with pytest.raises(ConfigError, match="cloze only"):
        Scoring("letter", "token")


def test_letter_encoding_is_unchanged_by_the_cloze_path(tok) -> None:
    letters = ("A", "B", "C", "D")
    task = SimpleNamespace(
        name="mc", style="mc", prompt_segments=lambda ex: prompt_segments(ex, "mc", letters)
    )
    enc = encode_split(task, EXAMPLES, tok, 600)
    assert enc.cloze is None
    assert tok.decode(enc.input_ids[0]).endswith("C) grass\nAnswer:")


def test_an_option_repeated_in_a_question_is_named_under_cloze_only(tok, tmp_path) -> None:
    """Two options of one text get one score under cloze, so the answer cannot win over its
    twin: a warning when the split is read, not again from the cache; letter scoring tells
    them apart by their letters and says nothing."""
    import json
    import warnings

    from blob_lora.tasks import get_task
    from blob_lora.tasks.dataset import MCDataset

    rows = [
        {"id": "plain", "question": "Which?", "choices": ["red", "blue"], "answer": 0},
        {
            "id": "twins",
            "question": "Which colour?",
            "choices": ["red", "blue", "red"],
            "answer": 2,
        },
    ]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(str(tmp_path))
    with pytest.warns(UserWarning, match=r"1 question\(s\) repeat an option's text \(twins\)"):
        MCDataset(task, "eval", tok, 600, scoring=Scoring.of("cloze"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MCDataset(task, "eval", tok, 600, scoring=Scoring.of("cloze"))  # cached: said once
        MCDataset(task, "eval", tok, 600)  # letter: nothing to say


# ---------------------------------------------------------------------------------------------
# one weight sample (or dropout mask) per question, shared by all of its options


def _sampling_scores(method_name: str, model, batch) -> torch.Tensor:
    from blob_lora.methods import get_method

    method = get_method(method_name)
    torch.manual_seed(0)
    with torch.no_grad(), method.sampling_mode(model, 1):
        return answer_logits(model, batch, None)


def _peft(method_name: str, tok):
    from peft import LoraConfig

    from blob_lora.tuners.blob import BlobConfig, get_blob_model

    base = tiny_base(tok, seed=6)
    targets = ["q_proj", "v_proj", "lm_head"]
    if method_name == "blob":
        model = get_blob_model(
            base,
            LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
            BlobConfig(init_std=0.9, prior_std=1.0),
        )
    else:
        from peft import get_peft_model

        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.5)
        cfg.init_lora_weights = False
        model = get_peft_model(base, cfg)
    return model.eval()


def test_blob_draws_one_weight_sample_per_question(tok) -> None:
    # Two options with the same text: scored by one weight sample they get the same score to
    # float rounding; a sample per option (or per token) would set them apart. The same
    # question twice in a batch gets two independent samples.
    model = _peft("blob", tok)
    ex = MCExample("s", "Which one?", ("blue sky", "blue sky", "red"), 0)
    batch = _batch(MC, [ex, ex], tok, 3)
    scores = _sampling_scores("blob", model, batch)
    # two ulps of a ~100-nat sum in fp32 (thread count changes the summation order)
    torch.testing.assert_close(scores[:, 0], scores[:, 1], atol=1e-5, rtol=1e-6)
    assert (scores[0] - scores[1]).abs().max() > 1e-3  # independent across questions
    assert (scores[0, 0] - scores[0, 2]).abs() > 1e-3


def test_mc_dropout_shares_the_prompt_pass_across_options(tok) -> None:
    # Single-token options are all predicted from the prompt's last position, computed once
    # per question under one dropout mask: equal texts get exactly equal scores.
    model = _peft("mc-dropout", tok)
    ex = MCExample("d", "Which one?", ("True", "True", "False"), 0)
    batch = _batch(MC, [ex, ex], tok, 3)
    assert (batch["branch"] > 0).sum() == 6  # one token per option
    scores = _sampling_scores("mc-dropout", model, batch)
    torch.testing.assert_close(scores[:, 0], scores[:, 1], atol=1e-6, rtol=0)
    assert (scores[0] - scores[1]).abs().max() > 1e-4  # a fresh mask per question


def test_split_by_length_cuts_each_chunk_to_its_rows_and_keeps_their_scores(tok) -> None:
    """Chunks of similar length hold every row once, cut to their own longest row with every
    row's real tokens and cloze fields intact: the option scores equal the whole batch's."""
    from blob_lora.tasks.dataset import TOKEN_FIELDS, split_by_length

    examples = [
        MCExample("long", "Which of these is a long question about colour?", ("red", "a blue"), 0),
        MCExample("short", "Hot?", ("sun", "ice"), 1),
        MCExample("mid", "What is cold in winter?", ("snow", "fire"), 0, context="Cold."),
        MCExample("tiny", "Up?", ("sky", "sea"), 0),
    ]
    batch = _batch(MC, examples, tok, 2)
    batch["index"] = torch.arange(4)
    lengths = batch["attention_mask"].sum(1)
    chunks = split_by_length(batch, 2)
    order = torch.argsort(lengths, stable=True)
    assert [c["index"].tolist() for c in chunks] == [order[:2].tolist(), order[2:].tolist()]
    for c in chunks:
        rows = c["index"]
        t = int(lengths[rows].max())
        assert tuple(c["input_ids"].shape) == (2, t)
        for key in TOKEN_FIELDS:  # the cut columns were padding only
            assert torch.equal(c[key], batch[key][rows, -t:]), key
        assert torch.equal(c["labels"], batch["labels"][rows])
        assert torch.equal(c["divisor"], batch["divisor"][rows])
    assert chunks[0]["input_ids"].shape[1] < batch["input_ids"].shape[1]  # padding was cut
    model = tiny_base(tok).eval()
    with torch.no_grad():
        whole = answer_logits(model, {k: v for k, v in batch.items() if k != "index"}, None)
        for c in chunks:
            part = answer_logits(model, {k: v for k, v in c.items() if k != "index"}, None)
            assert torch.allclose(part, whole[c["index"]], atol=1e-5)
    assert split_by_length(batch, 1) == [batch]
    assert len(split_by_length(batch, 9)) == 4  # at most one chunk per row


def _alibi_model(kind: str, tok):
    import transformers as tf

    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, attn_implementation="eager")
    config, model = {
        "bloom": (tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **ids), tf.BloomForCausalLM),
        "mpt": (tf.MptConfig(d_model=32, n_layers=2, n_heads=4, **ids), tf.MptForCausalLM),
        "falcon": (
            tf.FalconConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True, **ids
            ),
            tf.FalconForCausalLM,
        ),
    }[kind]
    torch.manual_seed(3)
    return model(config).eval()


@pytest.mark.parametrize("kind", ["bloom", "mpt", "falcon"])
def test_cloze_refuses_a_model_with_alibi_biases_and_letter_still_scores(tok, kind) -> None:
    """ALiBi takes distances from the sequence order, not from ``position_ids``, so packed
    options would sit at the wrong distance from their prompt (a tiny MPT scored 0.06 nats off
    its own forward; Bloom and Falcon failed on the 4-D mask)."""
    model = _alibi_model(kind, tok)
    with pytest.raises(ConfigError, match=rf"ALiBi attention biases \({kind}\).*--scoring letter"):
        answer_logits(model, _batch(MC, EXAMPLES, tok, 4), None)
    letters = ("A", "B", "C", "D")
    task = SimpleNamespace(
        name="mc", style="mc", prompt_segments=lambda ex: prompt_segments(ex, "mc", letters)
    )
    enc = encode_split(task, EXAMPLES, tok, 600)
    items = [
        {"input_ids": ids, "label": ex.label, "n_options": ex.n_options}
        for ids, ex in zip(enc.input_ids, EXAMPLES, strict=True)
    ]
    batch = MCCollator(tok.pad_token_id, 4)(items)
    option_ids = torch.tensor(tok.convert_tokens_to_ids([f"▁{c}" for c in letters]))
    with torch.no_grad():
        scores = answer_logits(model, batch, option_ids)
        for b, (ids, ex) in enumerate(zip(enc.input_ids, EXAMPLES, strict=True)):
            alone = model(torch.tensor([list(ids)])).logits[0, -1, option_ids]  # no padding
            n = ex.n_options
            torch.testing.assert_close(scores[b, :n], alone[:n], atol=2e-4, rtol=1e-4)


def test_training_with_cloze_on_an_alibi_model_is_refused_before_the_run_folder(
    tmp_path, data_root, capsys
) -> None:
    from blob_lora.cli.main import main
    from tests.factories import save_model_folder

    tok = tiny_tokenizer()
    model_dir = save_model_folder(tmp_path / "mpt", _alibi_model("mpt", tok), tok)
    argv = ["train", "--model", str(model_dir), "--task", "winogrande_s", "--method", "lora"]
    argv += ["--scoring", "cloze", "--train-split", "train_s[:8]", "--max-steps", "1"]
    argv += ["--data-root", str(data_root), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    assert "ALiBi" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _family_model(kind: str, tok):
    """A random tiny model of another family than Llama: learned absolute positions (GPT-2,
    OPT, GPT-BigCode), partial rotary (GPT-NeoX, GPT-J, CodeGen, Phi-3's fused qkv), parallel
    blocks (Falcon), Gemma's scaled embeddings."""
    import transformers as tf

    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, attn_implementation="sdpa")
    llama_like = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, **ids,
    )  # fmt: skip
    gpt = dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids)
    config, model = {
        "gpt2": (tf.GPT2Config(**gpt), tf.GPT2LMHeadModel),
        "gpt_bigcode": (tf.GPTBigCodeConfig(**gpt), tf.GPTBigCodeForCausalLM),
        "gptj": (tf.GPTJConfig(rotary_dim=4, **gpt), tf.GPTJForCausalLM),
        "codegen": (tf.CodeGenConfig(rotary_dim=4, n_ctx=256, **gpt), tf.CodeGenForCausalLM),
        "opt": (
            tf.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **llama_like),
            tf.OPTForCausalLM,
        ),
        "gpt_neox": (tf.GPTNeoXConfig(**llama_like), tf.GPTNeoXForCausalLM),
        "phi3": (
            tf.Phi3Config(original_max_position_embeddings=256, **llama_like),
            tf.Phi3ForCausalLM,
        ),
        "falcon": (
            tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **ids),
            tf.FalconForCausalLM,
        ),
        "gemma": (
            tf.GemmaConfig(head_dim=8, num_key_value_heads=2, **llama_like),
            tf.GemmaForCausalLM,
        ),
    }[kind]
    torch.manual_seed(3)
    return model(config).eval()


@pytest.mark.parametrize(
    "kind", ["gpt2", "gpt_bigcode", "gptj", "codegen", "opt", "gpt_neox", "phi3", "falcon", "gemma"]
)
def test_cloze_scores_equal_the_models_own_forward_across_families(tok, kind) -> None:
    """The packed sequences with their custom mask and position ids score every option as the
    model's own forward of ``prompt + option`` does, whatever the family's position encoding."""
    _scores_match_by_hand(_family_model(kind, tok), tok)
