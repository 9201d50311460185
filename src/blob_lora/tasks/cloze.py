"""Choice-likelihood ("cloze") scoring: every option is scored by its log-likelihood as a
continuation of the question, as in lm-evaluation-harness, instead of by one answer letter.

The class score of option ``k`` is ``sum_t log p(token_t | everything before it)`` over the
option's *scored* tokens, optionally divided by their number of tokens or characters
(``length_norm``: lm-evaluation-harness's ``acc_norm`` is the per-character variant). The
predictive is the softmax of the scores over the question's options, so training's
cross-entropy over them is the likelihood of the right option among the given ones.

Prompts (no option list; ``{...}`` stripped of surrounding whitespace)::

    multiple choice   [Context: {context}\\n]Question: {question}\\nAnswer:   + " {option}"
    boolq             Passage: {passage}\\nQuestion: {question}?\\nAnswer:   + " yes" / " no"
    winogrande        (nothing shared)   "{sentence before _}{option}"  + " {sentence after _}"

WinoGrande uses the standard *partial* scoring: the sentence with the option put in the blank,
scored on the words after the blank only (the words before it differ between options and would
make the comparison one of option frequency).

**One sequence per question.** The shared prompt and every option's continuation are packed
into one sequence: ``[prompt][option 1][option 2]...``. Each option's tokens attend to the
prompt and to their own option only (a 4-D attention mask built by
``blob_lora.models.forward``), and their positions continue from the prompt's end, so
every option is scored exactly as if it were a separate sequence ``prompt + option``. Packing
(1) runs the shared prompt once per question, not once per option; (2) makes a Bayesian weight
sample or a dropout mask, drawn per sequence, *one draw shared by all options of a question*
and independent across questions; (3) keeps one item per example for the frozen-prefix cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from blob_lora.tasks.examples import MCExample
from blob_lora.tasks.prompts import (
    ANSWER_CUE,
    CONTEXT,
    QUESTION,
    STYLE_BOOLQ,
    STYLE_MC,
    STYLE_WINOGRANDE,
    STYLES,
    Segment,
)
from blob_lora.utils.errors import ExampleError

BOOLQ_WORDS = {"True": "yes", "False": "no"}  # the answer words a reader would write


@dataclass(frozen=True)
class ClozeOption:
    """One option as a continuation: ``context`` (read, not scored) then ``scored`` text."""

    context: str
    scored: str


@dataclass(frozen=True)
class ClozePrompt:
    """The shared prompt (as truncatable segments) and each option's continuation."""

    shared: list[Segment]
    options: list[ClozeOption]


def _body(text: str) -> str:
    text = text.strip()
    return f" {text}" if text else ""


def cloze_prompt(ex: MCExample, style: str) -> ClozePrompt:
    """The cloze form of ``ex`` under the task's prompt ``style``."""
    cue = f"\n{ANSWER_CUE}"
    if style == STYLE_MC:
        shared = []
        if ex.context and ex.context.strip():
            shared += [Segment("Context:"), Segment(_body(ex.context), CONTEXT), Segment("\n")]
        shared += [Segment("Question:"), Segment(_body(ex.question), QUESTION), Segment(cue)]
        return ClozePrompt(shared, [ClozeOption("", _body(c)) for c in ex.choices])
    if style == STYLE_BOOLQ:
        q = ex.question.strip()
        mark = "" if q.endswith("?") else "?"
        shared = [
            Segment("Passage:"),
            Segment(_body(ex.context or ""), CONTEXT),
            Segment("\nQuestion:"),
            Segment(_body(q), QUESTION),
            Segment(mark + cue),
        ]
        words = [BOOLQ_WORDS.get(c.strip(), c) for c in ex.choices]
        return ClozePrompt(shared, [ClozeOption("", _body(w)) for w in words])
    if style == STYLE_WINOGRANDE:
        sentence = ex.question
        if sentence.count("_") != 1:
            raise ExampleError(
                f"example {ex.id!r}: a WinoGrande sentence needs exactly one blank '_' for "
                f"partial scoring, found {sentence.count('_')}",
                example_id=ex.id,
                line=ex.line,
            )
        before, after = sentence.split("_")
        after = _body(after)
        if not after:
            raise ExampleError(
                f"example {ex.id!r}: nothing follows the blank, so partial scoring has no "
                "words to score",
                example_id=ex.id,
                line=ex.line,
            )
        return ClozePrompt(
            [], [ClozeOption(before.lstrip() + c.strip(), after) for c in ex.choices]
        )
    raise ValueError(f"unknown prompt style {style!r}; expected one of {STYLES}")


def option_text(option: ClozeOption) -> str:
    return option.context + option.scored


def scored_chars(options: Sequence[ClozeOption]) -> list[int]:
    """Characters of each option's scored text (the per-character length normalisation)."""
    return [max(1, len(o.scored)) for o in options]
