"""Hypothesis strategies for malformed input: JSON values of every type, awkward text, and
records of each dataset schema in which any field may be missing or of the wrong type."""

from __future__ import annotations

import string

from hypothesis import strategies as st

# Every Unicode category, lone surrogates (Cs) included: JSON can carry them as "\ud800".
any_char = st.characters(blacklist_categories=())
text = st.one_of(
    st.text(any_char, max_size=40),
    st.text(string.printable, max_size=40),
    st.sampled_from(["", " ", "\n", "_", "Answer:", "A", "True", "\u2028", "\x00", "\ufeff"]),
    st.builds(
        lambda c, n: c * n, st.sampled_from(["x", "é ", "漢", "word "]), st.integers(500, 4000)
    ),
)
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 30),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


def maybe(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes any JSON value."""
    return st.one_of(good, good, json_values)


def record(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A JSON object whose fields are each present or not, plausible or not, plus junk keys."""
    return st.builds(
        lambda rec, extra: {**extra, **rec},
        st.fixed_dictionaries({}, optional={k: maybe(v) for k, v in fields.items()}),
        st.dictionaries(st.text(max_size=5), json_values, max_size=2),
    )


letters = st.sampled_from([*string.ascii_uppercase[:6], "a", "z", "", "AA", " b ", "1", "Z"])
labels = st.one_of(letters, st.integers(-1, 6))

BYO = record(
    {
        "question": text,
        "choices": st.lists(text, max_size=30),
        "answer": st.one_of(st.integers(-2, 30), letters),
        "context": st.one_of(st.none(), text),
        "id": st.one_of(text, st.integers()),
    }
)
ARC_LOCAL = record(
    {
        "id": text,
        "question": record(
            {
                "stem": text,
                "choices": st.lists(record({"text": text, "label": labels}), max_size=7),
            }
        ),
        "answerKey": labels,
    }
)
WINOGRANDE = record(
    {
        "qID": text,
        "sentence": text,
        "option1": text,
        "option2": text,
        "answer": st.sampled_from(["1", "2", 1, 2, "", "3", 0]),
    }
)
BOOLQ = record({"question": text, "passage": text, "answer": st.booleans(), "title": text})
MMLU_LOCAL = record(
    {
        "subject": st.sampled_from(["anatomy", "virology", ""]),
        "question": text,
        **{k: text for k in "ABCD"},
        "answer": st.sampled_from(["A", "B", "C", "D", "E", "", 0]),
    }
)
HUB_CHOICES = record({"text": st.lists(text, max_size=7), "label": st.lists(labels, max_size=7)})
ARC_HUB = record({"id": text, "question": text, "choices": HUB_CHOICES, "answerKey": labels})
OBQA_HUB = record({"id": text, "question_stem": text, "choices": HUB_CHOICES, "answerKey": labels})
MMLU_HUB = record(
    {
        "question": text,
        "subject": text,
        "choices": st.lists(text, max_size=6),
        "answer": st.integers(-1, 5),
    }
)

# Well-formed records with awkward but legal content (any Unicode but surrogates, empty or
# very long questions, long contexts), so that the valid path is exercised as much as the
# refusals.
legal_text = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.builds(lambda n: "long question " * n, st.integers(50, 400)),
)
short_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
VALID_BYO = st.lists(short_text, min_size=2, max_size=8).flatmap(
    lambda choices: st.fixed_dictionaries(
        {
            "question": legal_text,
            "choices": st.just(choices),
            "answer": st.one_of(
                st.integers(0, len(choices) - 1),
                st.sampled_from("ABCDEFGH"[: len(choices)] + "abcdefgh"[: len(choices)]),
            ),
        },
        optional={"context": st.one_of(st.none(), legal_text), "id": short_text},
    )
)
BYO_ROW = st.one_of(VALID_BYO, VALID_BYO, VALID_BYO, BYO)
