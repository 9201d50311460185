"""Task registry: the paper's datasets and a user's own folder, behind one ``Task`` type.

``get_task(name_or_path, data_root)`` resolves the data source once: an explicit
``data_root``, else the ``BLOB_LORA_DATA`` environment variable, else the Hugging Face Hub.
A local root never silently falls back to the Hub: a missing file is an error naming the
paths looked for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from blob_lora.tasks import prompts
from blob_lora.tasks.examples import MCExample
from blob_lora.tasks.sources import (
    BOOLQ_CHOICES,
    LETTERS,
    HubSource,
    LabelOptional,
    LocalSource,
    MMLULocalParser,
    env_data_root,
    parse_arc_hub,
    parse_arc_local,
    parse_boolq,
    parse_generic,
    parse_mmlu_hub,
    parse_obqa_hub,
    parse_winogrande,
    read_jsonl_examples,
    split_candidates,
)
from blob_lora.tasks.splits import SplitSpec, apply_split_slice, parse_split
from blob_lora.utils.errors import ConfigError, DataError

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip

ALIASES = ("train", "eval")


class Task:
    """A multiple-choice task: where its records come from and how they are prompted.

    ``option_letters`` are the answer words the model is scored on, in option order:
    ``("A", "B", ...)`` up to ``n_options`` for lettered tasks, ``("True", "False")`` for BoolQ.
    ``train_split`` / ``eval_split`` are split strings (``None`` if the task has none);
    ``load("train")`` and ``load("eval")`` resolve to them.
    """

    def __init__(
        self,
        name: str,
        n_options: int,
        option_letters: tuple[str, ...],
        train_split: str | None,
        eval_split: str,
        style: str,
        source: LocalSource | HubSource,
    ):
        if len(option_letters) != n_options:
            raise ValueError("option_letters must have n_options entries")
        self.name = name
        self.n_options = n_options
        self.option_letters = tuple(option_letters)
        self.train_split = train_split
        self.eval_split = eval_split
        self.style = style
        self.source = source

    def __repr__(self) -> str:
        return (
            f"Task({self.name!r}, n_options={self.n_options}, train={self.train_split!r}, "
            f"eval={self.eval_split!r}, source={type(self.source).__name__})"
        )

    def resolve_split(self, split: str) -> SplitSpec:
        """Parse ``split`` and replace the aliases ``train`` / ``eval`` by the task's splits.

        ``train`` is an alias only when the task's train split has another name (WinoGrande's
        ``train_s``); for ARC it is simply the file ``train``.
        """
        spec = parse_split(split)
        target = {"train": self.train_split, "eval": self.eval_split}.get(spec.name, spec.name)
        if target is None:
            raise ConfigError(f"task {self.name!r} has no {spec.name} split")
        base = parse_split(target)
        if not spec.sliced:
            return base
        if base.sliced:
            raise ConfigError(
                f"task {self.name!r}: {spec.name!r} is already the slice {target!r}; "
                "slice the underlying split instead"
            )
        return SplitSpec(base.name, spec.start, spec.stop, True)

    def load(self, split: str) -> list[MCExample]:
        """Examples of ``split`` (a split name, ``train``/``eval``, optionally ``[a:b]``)."""
        spec = self.resolve_split(split)
        try:
            examples = self.source.read(spec)
        except DataError as e:
            raise DataError(f"task {self.name!r}: {e}") from None
        for ex in examples:
            if ex.n_options > self.n_options:
                own = (  # a split of one's own folder beside train/validation/test
                    isinstance(self.source, LocalSource)
                    and self.source.parser is parse_generic
                    and spec.name not in BYO_SPLITS
                )
                raise DataError(
                    f"task {self.name!r}, split {spec.name!r}, example {ex.id!r}: "
                    f"{ex.n_options} options, more than the task's {self.n_options}"
                    + (
                        " (the most in its train, validation and test files, which fixes the "
                        "answer letters); score this split as a task folder of its own"
                        if own
                        else ""
                    )
                    + self.where(split, ex.line)
                )
        return apply_split_slice(examples, spec)

    def no_examples(self, split: str) -> DataError:
        """The error for ``split`` holding no examples, naming the file of a local split:
        raised where a split is to be trained on or scored (``tasks.task_inputs``)."""
        spec = self.resolve_split(split)
        return DataError(
            f"task {self.name!r}: split {str(spec)!r} holds no examples{self.where(split)}"
        )

    def where(self, split: str, line: int | None = None) -> str:
        """`` (<file>)``, or `` (<file>, line <line>)``, for a split read from a file, else
        ``""``: for errors about its examples that are found after they were read (a prompt too
        long to fit), when only the example's id and ``MCExample.line`` are at hand."""
        with contextlib.suppress(DataError):  # a missing file is reported elsewhere
            place = self.source.location(self.resolve_split(split).name)
            if place is not None:
                return f" ({place})" if line is None else f" ({place}, line {line})"
        return ""

    def source_fingerprint(self, split: str) -> str:
        """Identifies the data behind ``split`` (file name and content digest / Hub id) for caches."""
        spec = self.resolve_split(split)
        try:
            return f"{self.source.fingerprint(spec)}|{spec}"
        except DataError as e:
            raise DataError(f"task {self.name!r}: {e}") from None

    def prompt_segments(self, ex: MCExample) -> list[prompts.Segment]:
        return prompts.prompt_segments(ex, self.style, self.option_letters)

    def render_prompt(self, ex: MCExample) -> str:
        return prompts.render(ex, self.style, self.option_letters)


# ---------------------------------------------------------------------------------------------
# the paper's tasks

_BOOLQ_HINT = (
    ". BoolQ's train split is not in the offline copy: train on 'validation[:2270]' and "
    "evaluate on 'validation[2270:]' (seeded split), or read it from the Hub by leaving "
    "data_root and BLOB_LORA_DATA unset"
)


class _WinograndeSplitMap:
    """Local train_xs/train_s/train_m/... are Hub configs winogrande_xs/... split 'train'."""

    def __init__(self, config: str):
        self.config = config

    def __call__(self, split: str) -> tuple[str | None, str]:
        if split.startswith("train_"):
            return f"winogrande_{split[len('train_') :]}", "train"
        return self.config, split


def _letters(n: int) -> tuple[str, ...]:
    return LETTERS[:n]


def _source(root: Path | None, folder: str, local_parser, hub: HubSource, hint: str = ""):
    if root is None:
        return hub
    return LocalSource(root / folder, local_parser, hint=hint)


def _arc(name: str, hub_config: str) -> Callable[[Path | None], Task]:
    def build(root: Path | None) -> Task:
        hub = HubSource("allenai/ai2_arc", hub_config, parse_arc_hub)
        src = _source(root, name, parse_arc_local, hub)
        return Task(name, 5, _letters(5), "train", "validation", prompts.STYLE_MC, src)

    return build


def _obqa(root: Path | None) -> Task:
    hub = HubSource("allenai/openbookqa", "main", parse_obqa_hub)
    src = _source(root, "openbookqa", parse_arc_local, hub)
    return Task("openbookqa", 4, _letters(4), "train", "validation", prompts.STYLE_MC, src)


def _winogrande(size: str) -> Callable[[Path | None], Task]:
    def build(root: Path | None) -> Task:
        config = f"winogrande_{size}"
        hub = HubSource(
            "allenai/winogrande", config, parse_winogrande, split_map=_WinograndeSplitMap(config)
        )
        src = _source(root, "winogrande", parse_winogrande, hub)
        return Task(
            config, 2, _letters(2), f"train_{size}", "validation", prompts.STYLE_WINOGRANDE, src
        )

    return build


def _boolq(root: Path | None) -> Task:
    hub = HubSource("google/boolq", None, parse_boolq, id_prefix="boolq-")
    src = _source(root, "boolq", parse_boolq, hub, hint=_BOOLQ_HINT)
    if isinstance(src, LocalSource):
        src.id_prefix = "boolq-"
    return Task("boolq", 2, BOOLQ_CHOICES, "train", "validation", prompts.STYLE_BOOLQ, src)


def _mmlu(subject: str) -> Callable[[Path | None], Task]:
    def build(root: Path | None) -> Task:
        prefix = f"mmlu-{subject}-"
        hub = HubSource("cais/mmlu", subject, parse_mmlu_hub, id_prefix=prefix)
        src = _source(root, "mmlu", MMLULocalParser(subject), hub)
        if isinstance(src, LocalSource):
            src.id_prefix = prefix
        return Task(f"mmlu:{subject}", 4, _letters(4), "dev", "test", prompts.STYLE_MC, src)

    return build


_BUILDERS: dict[str, Callable[[Path | None], Task]] = {
    "winogrande_s": _winogrande("s"),
    "winogrande_m": _winogrande("m"),
    "arc_challenge": _arc("arc_challenge", "ARC-Challenge"),
    "arc_easy": _arc("arc_easy", "ARC-Easy"),
    "openbookqa": _obqa,
    "boolq": _boolq,
}
_BUILDERS.update({f"mmlu:{s}": _mmlu(s) for s in MMLU_SUBJECTS})


def list_tasks() -> list[str]:
    """Every registered task name: the six paper tasks, then ``mmlu:<subject>`` for 57 subjects."""
    return list(_BUILDERS)


# ---------------------------------------------------------------------------------------------
# bring your own data

BYO_SPLITS = ("train", "validation", "test")


def _byo_task(folder: Path, name: str) -> Task:
    """A folder with ``train.jsonl`` (optional) and ``validation.jsonl`` or ``test.jsonl``.

    Every present file of those three is read now, both to validate it early and to learn
    ``n_options`` (the largest option count), which fixes the answer letters. A ``test.jsonl``
    beside a ``validation.jsonl`` may lack answers (a held-out set, scored only when asked
    for, and then refused with its file and line): it counts towards ``n_options`` only.
    """
    src = LocalSource(folder, parse_generic)
    present = {}
    for split in BYO_SPLITS:
        path = next((p for p in split_candidates(folder, split) if p.is_file()), None)
        if path is not None:
            unscored = split == "test" and "validation" in present
            parser = LabelOptional() if unscored else parse_generic
            present[split] = read_jsonl_examples(path, parser, f"{split}-")
    eval_split = "validation" if "validation" in present else "test" if "test" in present else None
    if eval_split is None:
        looked = ", ".join(
            str(p) for s in ("validation", "test") for p in split_candidates(folder, s)
        )
        raise DataError(f"{folder}: no evaluation split; looked for {looked}")
    n_options = (
        max(ex.n_options for exs in present.values() for ex in exs) if any(present.values()) else 2
    )
    train_split = "train" if "train" in present else None
    return Task(
        name, n_options, _letters(n_options), train_split, eval_split, prompts.STYLE_MC, src
    )


def _unknown_task_message(name: str) -> str:
    paper = ", ".join(n for n in _BUILDERS if not n.startswith("mmlu:"))
    return (
        f"unknown task {name!r}. Known tasks: {paper}, and mmlu:<subject> for the "
        f"{len(MMLU_SUBJECTS)} MMLU subjects ({', '.join(MMLU_SUBJECTS)}). "
        "Or give the path of a folder holding train.jsonl and validation.jsonl (or test.jsonl) "
        "with records {question, choices, answer[, context]}."
    )


def get_task(
    name_or_path: str | os.PathLike[str], data_root: str | os.PathLike | None = None
) -> Task:
    """Resolve a task name (see ``list_tasks``) or a bring-your-own folder to a ``Task``.

    The source of a named task is ``data_root`` if given, else ``$BLOB_LORA_DATA``, else the
    Hugging Face Hub. Registered names win over folders of the same name (write ``./boolq``
    to mean the folder).
    """
    raw = os.fspath(name_or_path)
    key = raw.strip().lower()
    if key in _BUILDERS:
        root = data_root if data_root is not None else env_data_root()
        return _BUILDERS[key](Path(root).expanduser() if root is not None else None)
    path = Path(raw).expanduser()
    if path.is_dir():
        return _byo_task(path, raw)
    if key.startswith("mmlu:"):
        raise ConfigError(
            f"unknown MMLU subject {raw[5:]!r}; known subjects: {', '.join(MMLU_SUBJECTS)}"
        )
    if path.exists():
        raise DataError(f"{path} is a file; a task folder holding train.jsonl etc. is expected")
    if os.sep in raw or raw.startswith("."):
        raise DataError(f"task folder {path} does not exist")
    raise ConfigError(_unknown_task_message(raw))
