"""Scoring by answer tokens: which vocabulary ids stand for the options, and their logits.

The model reads a prompt ending in ``"Answer:"``; its next-token logits at the last position,
restricted to the option tokens, are the class logits. The option token is the one the
tokenizer *actually produces* for the letter right after the cue: byte-level BPE (SmolLM2,
GPT-2) gives ``"ĠA"`` and sentencepiece-style (Llama) gives ``"▁A"``, never the bare ``"A"``
that ``convert_tokens_to_ids("A")`` would return.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blob_lora.tasks.prompts import ANSWER_CUE
from blob_lora.utils.errors import ConfigError

# Any text ending in the cue works; this mirrors the last lines of every prompt.
PROBE_PROMPT = f"Question: Which option is right?\nA) one\nB) two\n{ANSWER_CUE}"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def option_token_ids(tokenizer, task) -> torch.LongTensor:
    """(C,) ids of ``task.option_letters`` as the tokenizer writes them after ``"Answer:"``.

    Each is found by tokenizing ``probe + " " + letter`` and checking that it equals the
    probe's tokens plus exactly one more. Raises ``ConfigError`` if a letter is not a single
    token there, or two letters share a token: such a tokenizer cannot score the task.
    """
    base = _encode(tokenizer, PROBE_PROMPT)
    ids: list[int] = []
    for letter in task.option_letters:
        full = _encode(tokenizer, f"{PROBE_PROMPT} {letter}")
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            extra = full[len(base) :] if full[: len(base)] == base else full[-3:]
            pieces = tokenizer.convert_ids_to_tokens(extra)
            raise ConfigError(
                f"task {task.name!r}: option {letter!r} does not map to one token after the "
                f"answer cue {ANSWER_CUE!r}: {ANSWER_CUE + ' ' + letter!r} ends in tokens "
                f"{pieces}; this tokenizer cannot score the task by answer tokens"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"task {task.name!r}: options {task.option_letters} share tokens {ids}")
    return torch.tensor(ids, dtype=torch.long)


def option_logits(
    last_logits: torch.Tensor, option_token_ids: torch.Tensor, option_mask: torch.Tensor
) -> torch.Tensor:
    """(B, C) logits of the option tokens; options absent from a question get ``-inf``.

    ``last_logits`` is (B, V) (a (B, 1, V) output of ``logits_to_keep=1`` is accepted too).
    With ``-inf`` a softmax over the result gives masked options exactly zero probability.
    Every row must keep at least one option (the collator guarantees two).
    """
    if last_logits.dim() == 3:
        last_logits = last_logits[:, -1, :]
    if last_logits.dim() != 2:
        raise ValueError(f"last_logits must be (B, V), got shape {tuple(last_logits.shape)}")
    ids = option_token_ids.to(device=last_logits.device, dtype=torch.long)
    selected = last_logits.index_select(-1, ids)
    if option_mask.shape != selected.shape:
        raise ValueError(
            f"option_mask shape {tuple(option_mask.shape)} does not match (B, C) = "
            f"{tuple(selected.shape)}"
        )
    mask = option_mask.to(device=last_logits.device, dtype=torch.bool)
    return selected.masked_fill(~mask, float("-inf"))


SCORING_MODES = ("letter", "cloze")
LENGTH_NORMS = ("none", "token", "char")


@dataclass(frozen=True)
class Scoring:
    """How an option's class score is read from the model: a task setting, not a method's.

    ``mode``: ``letter`` (the paper's: the next-token logit of the option's letter after a
    prompt that lists the options) or ``cloze`` (the log-likelihood of the option's own text
    as a continuation, ``blob_lora.tasks.cloze``). ``length_norm`` (cloze only) divides that
    log-likelihood by the option's scored ``token`` count or ``char`` count; the default
    ``none`` keeps the plain sum, the model's own log-probability of the option, so the softmax
    over options is the model's conditional distribution over them (normalising is a zero-shot
    ranking heuristic that changes the predictive's temperature per option).
    """

    mode: str = "letter"
    length_norm: str = "none"

    def __post_init__(self) -> None:
        if self.mode not in SCORING_MODES:
            raise ConfigError(f"--scoring must be one of {SCORING_MODES}, got {self.mode!r}")
        if self.length_norm not in LENGTH_NORMS:
            raise ConfigError(
                f"--length-norm must be one of {LENGTH_NORMS}, got {self.length_norm!r}"
            )
        if self.mode == "letter" and self.length_norm != "none":
            raise ConfigError(
                f"--length-norm {self.length_norm} applies to --scoring cloze only "
                "(letter scoring reads one token per option)"
            )

    @classmethod
    def of(cls, value: Scoring | str, like: Scoring | None = None) -> Scoring:
        """``value`` itself, or the scoring of a mode's name: ``like``'s (a run's scoring)
        length normalisation when it is ``like``'s own mode, as ``--scoring`` does, else the
        plain sum."""
        if isinstance(value, Scoring):
            return value
        if isinstance(value, str):
            same = like is not None and like.mode == value
            return cls(value, like.length_norm if same else "none")
        raise ConfigError(f"scoring must be a Scoring or one of {SCORING_MODES}, got {value!r}")

    @property
    def is_cloze(self) -> bool:
        return self.mode == "cloze"

    def describe(self) -> str:
        return self.mode if self.length_norm == "none" else f"{self.mode} ({self.length_norm})"


LETTER = Scoring()


def scoring_option_ids(tokenizer, task, scoring: Scoring = LETTER) -> torch.LongTensor | None:
    """The answer-token ids letter scoring reads; ``None`` under cloze scoring (not needed)."""
    return None if scoring.is_cloze else option_token_ids(tokenizer, task)
