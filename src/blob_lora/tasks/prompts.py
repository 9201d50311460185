"""Zero-shot prompts, built from segments so truncation knows which text it may shorten.

Every prompt ends with the answer cue ``"\\nAnswer:"``; the model's next token is read at that
position and compared over the option tokens (``" A"``, ``" B"``, ... or ``" True"``/``" False"``).

Formats (``{...}`` is the record's text, stripped of surrounding whitespace)::

    multiple choice (ARC, OBQA, MMLU, your own data)
        [Context: {context}\\n]          <- only when the record has a context
        Question: {question}\\n
        A) {choice 0}\\n
        B) {choice 1}\\n  ...
        Answer:

    winogrande
        Sentence: {sentence with _}\\n
        Which option fills the blank (_)?\\n
        A) {option1}\\n
        B) {option2}\\n
        Answer:

    boolq (options are the words True / False; label True -> "True")
        Passage: {title} -- {passage}\\n
        Question: {question}?\\n        <- "?" added unless already there
        True or False?\\n
        Answer:

Truncatable segments: the context/passage (shortened from its end, keeping the start) and
then the question or sentence (shortened from its start, keeping the part next to the
options). Option lines and the cue are never truncated. Each truncatable segment carries its
own leading space, so the tokens that cover it never include the fixed text around it.
"""

from __future__ import annotations

from dataclasses import dataclass

from blob_lora.tasks.examples import MCExample

ANSWER_CUE = "Answer:"
CONTEXT = "context"  # truncated first, from the end
QUESTION = "question"  # truncated second, from the start
TRUNCATION_ORDER = (CONTEXT, QUESTION)

STYLE_MC = "mc"
STYLE_WINOGRANDE = "winogrande"
STYLE_BOOLQ = "boolq"
STYLES = (STYLE_MC, STYLE_WINOGRANDE, STYLE_BOOLQ)


@dataclass(frozen=True)
class Segment:
    text: str
    role: str | None = None  # None: never truncated; CONTEXT or QUESTION otherwise


def _options(ex: MCExample, letters: tuple[str, ...]) -> str:
    return "".join(f"\n{letters[i]}) {c.strip()}" for i, c in enumerate(ex.choices))


def _body(text: str) -> str:
    text = text.strip()
    return f" {text}" if text else ""


def prompt_segments(ex: MCExample, style: str, letters: tuple[str, ...]) -> list[Segment]:
    """The prompt of ``ex`` as segments whose concatenation is the prompt string."""
    cue = f"\n{ANSWER_CUE}"
    if style == STYLE_MC:
        segs = []
        if ex.context and ex.context.strip():
            segs += [Segment("Context:"), Segment(_body(ex.context), CONTEXT), Segment("\n")]
        segs += [
            Segment("Question:"),
            Segment(_body(ex.question), QUESTION),
            Segment(_options(ex, letters) + cue),
        ]
        return segs
    if style == STYLE_WINOGRANDE:
        return [
            Segment("Sentence:"),
            Segment(_body(ex.question), QUESTION),
            Segment("\nWhich option fills the blank (_)?" + _options(ex, letters) + cue),
        ]
    if style == STYLE_BOOLQ:
        q = ex.question.strip()
        mark = "" if q.endswith("?") else "?"
        return [
            Segment("Passage:"),
            Segment(_body(ex.context or ""), CONTEXT),
            Segment("\nQuestion:"),
            Segment(_body(q), QUESTION),
            Segment(f"{mark}\n{' or '.join(letters)}?{cue}"),
        ]
    raise ValueError(f"unknown prompt style {style!r}; expected one of {STYLES}")


def render(ex: MCExample, style: str, letters: tuple[str, ...]) -> str:
    return "".join(s.text for s in prompt_segments(ex, style, letters))
