"""Where records come from (local JSONL files, the Hugging Face Hub) and how each schema is read.

Local files keep each dataset's *original* schema (see the data README); the Hub datasets
use different field names, so every dataset has one parser per origin. A parser turns one
record (a dict) into an ``MCExample``, returns ``None`` to skip it (MMLU rows of another
subject), or raises ``RecordProblem``; the reader adds the file and 1-based line number so
every ``DataError`` points at the offending line.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import hashlib
import json
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from blob_lora.tasks.examples import MAX_OPTIONS, MIN_OPTIONS, MCExample
from blob_lora.tasks.splits import SplitSpec
from blob_lora.utils.errors import DataError
from blob_lora.utils.hub import unreachable_for

LETTERS = tuple(chr(ord("A") + i) for i in range(MAX_OPTIONS))
#: what to do where the Hub cannot serve a paper task's data
LOCAL_DATA_HINT = (
    "To read local files instead, set BLOB_LORA_DATA or pass --data-root (data_root= in "
    "Python) to a folder laid out as <dataset>/<split>.jsonl (arc_easy/train.jsonl, ...)"
)


class RecordProblem(Exception):
    """What is wrong with one record; turned into a DataError naming file and line."""


Parser = Callable[[dict[str, Any], str], "MCExample | None"]
"""``parser(record, fallback_id)``: ``fallback_id`` is used when the record has no id."""


# ---------------------------------------------------------------------------------------------
# field helpers


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(rec: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str = "") -> Any:
    name = f"{where}{key}"
    if key not in rec:
        raise RecordProblem(f"missing field {name!r}")
    value = rec[key]
    # bool is an int subclass; a boolean is never a valid index or text
    if not isinstance(value, typ) or (isinstance(value, bool) and bool not in _as_tuple(typ)):
        want = " or ".join(t.__name__ for t in _as_tuple(typ))
        raise RecordProblem(f"field {name!r} must be {want}, got {_type_name(value)}")
    return value


def _as_tuple(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _optional_str(rec: dict[str, Any], key: str) -> str | None:
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordProblem(f"field {key!r} must be a string, got {_type_name(value)}")
    return str(value)


def make_example(
    rid: str, question: str, choices: list[str], label: int, context: str | None = None
) -> MCExample:
    """Build an MCExample after the checks every schema shares (option count, label range)."""
    for what, text in (("id", rid), ("question", question), ("context", context or "")):
        _check_text(what, text)
    for i, c in enumerate(choices):
        _check_text(f"choices[{i}]", c)
    n = len(choices)
    if n < MIN_OPTIONS:
        raise RecordProblem(f"needs at least {MIN_OPTIONS} options, got {n}")
    if n > MAX_OPTIONS:
        raise RecordProblem(f"has {n} options; at most {MAX_OPTIONS} (A-Z) are supported")
    if not 0 <= label < n:
        raise RecordProblem(f"answer {label} is out of range for {n} options (0..{n - 1})")
    return MCExample(rid, question, tuple(choices), label, context)


def _check_text(what: str, text: str) -> None:
    """Refuse text that no tokenizer accepts: JSON can carry lone UTF-16 surrogates
    (``"\\ud800"``), which are not Unicode characters and cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordProblem(
            f"{what} holds an invalid character {text[e.start]!r} at position {e.start} "
            "(a lone UTF-16 surrogate escape)"
        ) from None


def _labelled_choices(texts: list[Any], labels: list[Any], key: Any, where: str) -> tuple:
    """ARC/OBQA: choices carry their own labels ("A".."E" or "1".."4"); find answerKey."""
    if len(texts) != len(labels):
        raise RecordProblem(f"{where}: {len(texts)} choice texts but {len(labels)} labels")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise RecordProblem(f"{where}[{i}] text must be str, got {_type_name(t)}")
    labels = [str(x) for x in labels]
    if not isinstance(key, str):
        raise RecordProblem(f"field 'answerKey' must be str, got {_type_name(key)}")
    if key not in labels:
        raise RecordProblem(f"answerKey {key!r} is not one of the choice labels {labels}")
    return list(texts), labels.index(key)


# ---------------------------------------------------------------------------------------------
# parsers, one per (dataset, origin)


def parse_arc_local(rec: dict[str, Any], fallback_id: str) -> MCExample:
    """ARC / OpenBookQA original: question.stem, question.choices[{text,label}], answerKey."""
    rid = _optional_str(rec, "id") or fallback_id
    q = _get(rec, "question", dict)
    stem = _get(q, "stem", str, "question.")
    choices = _get(q, "choices", list, "question.")
    texts, labels = [], []
    for i, c in enumerate(choices):
        if not isinstance(c, dict):
            raise RecordProblem(f"question.choices[{i}] must be an object, got {_type_name(c)}")
        texts.append(_get(c, "text", str, f"question.choices[{i}]."))
        labels.append(_get(c, "label", (str, int), f"question.choices[{i}]."))
    texts, label = _labelled_choices(texts, labels, _get(rec, "answerKey", str), "question.choices")
    return make_example(rid, stem, texts, label)


def _parse_labelled_hub(rec: dict[str, Any], fallback_id: str, stem_key: str) -> MCExample:
    """The Hub's ARC/OBQA schema: id, the question under ``stem_key``, choices {text: [...],
    label: [...]}, answerKey."""
    rid = _optional_str(rec, "id") or fallback_id
    stem = _get(rec, stem_key, str)
    ch = _get(rec, "choices", dict)
    texts = _get(ch, "text", list, "choices.")
    labels = _get(ch, "label", list, "choices.")
    texts, label = _labelled_choices(texts, labels, _get(rec, "answerKey", str), "choices.text")
    return make_example(rid, stem, texts, label)


def parse_arc_hub(rec: dict[str, Any], fallback_id: str) -> MCExample:
    """allenai/ai2_arc: id, question (str), choices {text: [...], label: [...]}, answerKey."""
    return _parse_labelled_hub(rec, fallback_id, "question")


def parse_obqa_hub(rec: dict[str, Any], fallback_id: str) -> MCExample:
    """allenai/openbookqa "main": id, question_stem, choices {text, label}, answerKey."""
    return _parse_labelled_hub(rec, fallback_id, "question_stem")


def parse_winogrande(rec: dict[str, Any], fallback_id: str) -> MCExample:
    """WinoGrande (local and Hub): sentence with one '_', option1, option2, answer "1"/"2"."""
    rid = _optional_str(rec, "qID") or fallback_id
    sentence = _get(rec, "sentence", str)
    o1 = _get(rec, "option1", str)
    o2 = _get(rec, "option2", str)
    answer = _get(rec, "answer", (str, int))
    if str(answer) not in ("1", "2"):
        hint = " (the unlabelled test split cannot be scored)" if answer == "" else ""
        raise RecordProblem(f"answer must be '1' or '2', got {answer!r}{hint}")
    return make_example(rid, sentence, [o1, o2], int(answer) - 1)


BOOLQ_CHOICES = ("True", "False")


def parse_boolq(rec: dict[str, Any], fallback_id: str) -> MCExample:
    """BoolQ (Google original and Hub): question, passage, answer (bool), optional title.

    The label is the index in ("True", "False"): answer True -> 0 -> the "True" option. (The
    authors' code scored label 1 against "False"; that inversion is deliberately not copied.)
    """
    question = _get(rec, "question", str)
    passage = _get(rec, "passage", str)
    answer = _get(rec, "answer", bool)
    title = _optional_str(rec, "title")
    context = f"{title} -- {passage}" if title else passage
    return make_example(fallback_id, question, list(BOOLQ_CHOICES), 0 if answer else 1, context)


class MMLULocalParser:
    """Converted MMLU rows: subject, question, A, B, C, D, answer "A".."D"; other subjects skip.

    A class rather than a closure so tasks (and datasets holding them) can be pickled into
    DataLoader worker processes.
    """

    def __init__(self, subject: str):
        self.subject = subject

    def __call__(self, rec: dict[str, Any], fallback_id: str) -> MCExample | None:
        if _get(rec, "subject", str) != self.subject:
            return None
        question = _get(rec, "question", str)
        choices = [_get(rec, k, str) for k in "ABCD"]
        answer = _get(rec, "answer", str)
        if answer not in ("A", "B", "C", "D"):
            raise RecordProblem(f"answer must be one of 'A'..'D', got {answer!r}")
        return make_example(fallback_id, question, choices, "ABCD".index(answer))


def parse_mmlu_hub(rec: dict[str, Any], fallback_id: str) -> MCExample:
    """cais/mmlu <subject>: question, subject, choices (list of 4 str), answer (int 0-3)."""
    question = _get(rec, "question", str)
    choices = _get(rec, "choices", list)
    for i, c in enumerate(choices):
        if not isinstance(c, str):
            raise RecordProblem(f"choices[{i}] must be str, got {_type_name(c)}")
    return make_example(fallback_id, question, list(choices), _get(rec, "answer", int))


#: the fields of the bring-your-own schema
GENERIC_FIELDS = ("id", "question", "choices", "answer", "context")


@functools.lru_cache(maxsize=64)
def _misspelled(keys: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """``(key, field)`` for each key that is not a field of the schema but so close to one the
    record lacks (``contxt``, ``Question``, ``answers``) that it is most likely that field
    misspelled. Other extra keys (a user's own metadata) are left alone."""
    absent = [f for f in GENERIC_FIELDS if f not in keys]
    found = []
    for key in sorted(keys - set(GENERIC_FIELDS)):
        # 0.87: catches a dropped or doubled letter and a capital (contxt, answr, answers,
        # choice, Question) but not names of a user's own (idx, qid, question_id, content,
        # answered: 0.8-0.86); a required field's worse misspelling is still "missing"
        close = difflib.get_close_matches(key.lower(), absent, n=1, cutoff=0.87)
        if close:
            found.append((key, close[0]))
    return tuple(found)


def check_field_names(rec: dict[str, Any]) -> None:
    """Refuse a record whose field name is a near miss of a schema field it lacks: read as
    written, an optional field (``context``, ``id``, a prediction's ``answer``) would be
    dropped without a word and the prompts built without it."""
    keys = frozenset(k for k in rec if isinstance(k, str))
    for key, field in _misspelled(keys):
        raise RecordProblem(
            f"field {key!r} is not one this schema reads; did you mean {field!r}? "
            f"(fields: {', '.join(GENERIC_FIELDS)}; rename it if it is a field of your own)"
        )


def parse_generic(rec: dict[str, Any], fallback_id: str) -> MCExample:
    """Bring-your-own schema: question, choices [str, ...], answer (0-based int or letter),
    optional context and id; a near miss of a field's name is refused (``check_field_names``)."""
    check_field_names(rec)
    rid = _optional_str(rec, "id") or fallback_id
    question = _get(rec, "question", str)
    choices = _get(rec, "choices", list)
    for i, c in enumerate(choices):
        if not isinstance(c, str):
            raise RecordProblem(f"choices[{i}] must be str, got {_type_name(c)}")
        if not c.strip():  # a letter would still score it; cloze has nothing to score
            raise RecordProblem(f"choices[{i}] is empty")
    answer = _get(rec, "answer", (int, str))
    label = _letter_label(answer, choices) if isinstance(answer, str) else answer
    context = rec.get("context")
    if context is not None and not isinstance(context, str):
        raise RecordProblem(f"field 'context' must be str or null, got {_type_name(context)}")
    return make_example(rid, question, list(choices), label, context or None)


def _letter_label(answer: str, choices: list[str]) -> int:
    """The 0-based label of a letter ``answer``, refusing what a reader would take otherwise:
    a letter past the row's options, an option's text given as the answer, and a letter that
    is also the text of another option (``choices: ["B", "A"], answer: "A"``)."""
    letter = answer.strip().upper()
    texts = [i for i, c in enumerate(choices) if c.strip() == answer.strip()]
    if len(letter) != 1 or letter not in LETTERS:
        hint = f"; it is the text of option {texts[0]}: write {texts[0]}" if texts else ""
        raise RecordProblem(f"answer {answer!r} is neither a 0-based index nor a letter A-Z{hint}")
    label = LETTERS.index(letter)
    n = len(choices)
    if label >= n and n >= MIN_OPTIONS:
        # a one-letter option text (choices ["x", "y", "z"], answer "y") is the likelier reading
        hint = f"; it is the text of option {texts[0]}: write {texts[0]}" if texts else ""
        raise RecordProblem(
            f"answer {answer!r} is option {label} (0-based), but the row has {n} options "
            f"(A-{LETTERS[n - 1]}){hint}"
        )
    if texts and texts[0] != label:
        raise RecordProblem(
            f"answer {answer!r} is ambiguous: letter {letter} is option {label}, but option "
            f"{texts[0]}'s text is {choices[texts[0]]!r}; write the 0-based index"
        )
    return label


# ---------------------------------------------------------------------------------------------
# reading JSONL files

_FILE_CACHE: OrderedDict[tuple[str, int, int, int], list[tuple[int, Any]]] = OrderedDict()
_FILE_CACHE_SIZE = 8


def _file_version(path: Path) -> tuple[str, int, int, int]:
    """Path, size, mtime and ctime: ctime moves on every write, even one that restores mtime."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)


JSON_WHITESPACE = " \t\r\n"  # RFC 8259; str.strip() would also drop \x1c-\x1f, \x85, ...


class LabelOptional:
    """``parse_generic`` with ``answer`` optional; remembers which records had one: for
    questions to predict, and for a task folder's ``test.jsonl`` beside its
    ``validation.jsonl`` (often unlabelled, and not scored unless asked for)."""

    def __init__(self) -> None:
        self.labelled: list[bool] = []

    def __call__(self, rec: dict[str, Any], fallback_id: str) -> MCExample:
        has = rec.get("answer") is not None
        if not has:  # before ``answer`` is filled in (``answr`` is a near miss of it); a
            check_field_names(rec)  # labelled record is checked by parse_generic as it is
        ex = parse_generic(rec if has else {**rec, "answer": 0}, fallback_id)
        self.labelled.append(has)
        return ex


def decode_jsonl(lines: Iterable[bytes], where: str) -> list[tuple[int, Any]]:
    """(line number, decoded JSON value) for every non-blank line of ``lines`` (a file opened
    in binary, standard input's buffer); errors name ``where`` and the line."""
    rows: list[tuple[int, Any]] = []
    for lineno, raw in enumerate(lines, 1):
        try:
            # utf-8-sig on the first line: editors on Windows start files with a BOM
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}, line {lineno}: not valid UTF-8 ({e.reason})") from e
        if not line.strip(JSON_WHITESPACE):
            continue  # blank; a line of other "spaces" (\x1c, \x85) is bad JSON
        try:
            # without its line ending, so an error at the end of the line names its column,
            # not column 1 of the "line" after the newline
            rows.append((lineno, json.loads(line.rstrip("\r\n"))))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})"
            ) from e
        except (ValueError, RecursionError) as e:  # 5000-digit numbers, deep nesting
            raise DataError(f"{where}, line {lineno}: invalid JSON ({e})") from e
    return rows


def _read_jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, decoded JSON value) for every non-blank line; cached per file version so
    the 57 MMLU subjects share one parse of each file."""
    key = _file_version(path)
    if key in _FILE_CACHE:
        _FILE_CACHE.move_to_end(key)
        return _FILE_CACHE[key]
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            rows = decode_jsonl(f, str(path))
    except (OSError, EOFError, zlib.error) as e:  # unreadable file, truncated or corrupt gzip
        raise DataError(f"{path}: cannot read ({e})") from e
    _FILE_CACHE[key] = rows
    while len(_FILE_CACHE) > _FILE_CACHE_SIZE:
        _FILE_CACHE.popitem(last=False)
    return rows


def parse_rows(rows: Any, parser: Parser, where: str, id_prefix: str, unit: str) -> list[MCExample]:
    """Run ``parser`` over ``(number, record)`` pairs; errors name ``where`` and the number.
    Ids must be unique: they name the rows of ``predictions.jsonl`` and of error messages.
    With ``unit="line"`` each example keeps its number as ``MCExample.line``, for the errors
    found after reading (``utils.errors.ExampleError``)."""
    out: list[MCExample] = []
    seen: dict[str, int] = {}
    for number, rec in rows:
        try:
            if not isinstance(rec, dict):
                raise RecordProblem(f"expected a JSON object, got {_type_name(rec)}")
            ex = parser(rec, f"{id_prefix}{number}")
            if ex is not None and ex.id in seen:
                given = rec.get("id") is not None
                raise RecordProblem(
                    f"id {ex.id!r} repeats {unit} {seen[ex.id]}'s"
                    if given
                    else f"it has no id, and the one it is given by position, {ex.id!r}, is "
                    f"{unit} {seen[ex.id]}'s own id: give every {unit} an id, or none"
                )
        except RecordProblem as e:
            raise DataError(f"{where}, {unit} {number}: {e}") from None
        if ex is not None:
            seen[ex.id] = number
            out.append(replace(ex, line=number) if unit == "line" else ex)
    return out


def read_jsonl_examples(path: Path, parser: Parser, id_prefix: str) -> list[MCExample]:
    return parse_rows(_read_jsonl_rows(path), parser, str(path), id_prefix, "line")


def split_candidates(folder: Path, split: str) -> list[Path]:
    return [folder / f"{split}.jsonl", folder / f"{split}.jsonl.gz"]


def available_splits(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    names = set()
    for p in folder.iterdir():
        for suffix in (".jsonl.gz", ".jsonl"):
            if p.name.endswith(suffix) and p.is_file():
                names.add(p.name[: -len(suffix)])
                break
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# sources


class LocalSource:
    """``<folder>/<split>.jsonl`` or ``.jsonl.gz`` in one schema."""

    def __init__(self, folder: Path, parser: Parser, id_prefix: str = "", hint: str = ""):
        self.folder = Path(folder)
        self.parser = parser
        self.id_prefix = id_prefix
        self.hint = hint

    def find(self, split: str) -> Path:
        candidates = split_candidates(self.folder, split)
        for p in candidates:
            if p.is_file():
                return p
        have = available_splits(self.folder)
        have_s = ", ".join(have) if have else "none"
        raise DataError(
            f"split {split!r} not found: looked for {candidates[0]} and {candidates[1]} "
            f"(splits present: {have_s}){self.hint}"
        )

    def read(self, spec: SplitSpec) -> list[MCExample]:
        path = self.find(spec.name)
        return read_jsonl_examples(path, self.parser, f"{self.id_prefix}{spec.name}-")

    def fingerprint(self, spec: SplitSpec) -> str:
        path = self.find(spec.name)
        return f"file:{path.name}:{file_digest(path)}"

    def location(self, split: str) -> str | None:
        """The file of ``split``, for errors about its questions found after it was read."""
        return str(self.find(split))


_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a data file's bytes: what caches of its tokenised rows and features key on.

    Content, not (path, size, mtime): a copy of the same data elsewhere, or the same files
    re-synced with fresh timestamps (as shared folders are at every session here), must find
    the caches again, and rebuilding prefix features costs a full forward per example. Each
    file is read once per process (the digest is remembered per ``_file_version``).
    """
    key = _file_version(path)
    digest = _FILE_DIGESTS.get(key)
    if digest is None:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        _FILE_DIGESTS[key] = digest
    return digest


class HubSource:
    """A Hugging Face Hub dataset read with ``datasets.load_dataset(path, config, split=...)``.

    ``split_map`` maps the task's split name to the Hub's (config, split): WinoGrande's
    ``train_s`` is config ``winogrande_s`` split ``train``.
    """

    def __init__(
        self,
        path: str,
        config: str | None,
        parser: Parser,
        id_prefix: str = "",
        split_map: Callable[[str], tuple[str | None, str]] | None = None,
    ):
        self.path = path
        self.config = config
        self.parser = parser
        self.id_prefix = id_prefix
        self.split_map = split_map or self._same_split

    def _same_split(self, split: str) -> tuple[str | None, str]:
        return self.config, split

    def read(self, spec: SplitSpec) -> list[MCExample]:
        import datasets  # imported lazily: only the Hub path needs it

        config, split = self.split_map(spec.name)
        where = f"hf://datasets/{self.path}" + (f" ({config})" if config else "")
        where += f" split {split!r}"
        unreachable = unreachable_for(self.path, "README.md", repo_type="dataset")
        if unreachable is not None:
            raise DataError(
                f"cannot load {where}: the Hugging Face Hub is unreachable ({unreachable}) and "
                f"the dataset is not in the local Hugging Face caches. {LOCAL_DATA_HINT}"
            )
        try:
            if config is None:
                ds = datasets.load_dataset(self.path, split=split)
            else:
                ds = datasets.load_dataset(self.path, config, split=split)
        except Exception as e:  # network, auth, unknown split: all are data problems here
            raise DataError(
                f"could not load {where} from the Hugging Face Hub: {type(e).__name__}: "
                f"{str(e).rstrip('.')}. {LOCAL_DATA_HINT}"
            ) from e
        rows = ((i, rec) for i, rec in enumerate(ds, 1))
        return parse_rows(rows, self.parser, where, f"{self.id_prefix}{spec.name}-", "row")

    def fingerprint(self, spec: SplitSpec) -> str:
        config, split = self.split_map(spec.name)
        return f"hub:{self.path}:{config}:{split}"

    def location(self, split: str) -> str | None:
        """``None``: a Hub split's errors name its rows by id (the read errors name the
        dataset, config and split themselves)."""
        return None


def env_data_root() -> str | None:
    value = os.environ.get("BLOB_LORA_DATA", "").strip()
    return value or None
