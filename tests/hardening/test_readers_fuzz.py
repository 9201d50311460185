"""Property-based tests of the dataset readers on malformed input.

Whatever a data file holds, reading it ends in one of two ways: a ``DataError`` (a
``BlobLoraError``/``ValueError``) naming the file and line, or examples that are valid all the
way to a tokenised, collated batch. Never a traceback from inside json/gzip/tokenizers, never
a half-written cache file. Examples per test are fixed (see ``settings``) to bound CI time.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from blob_lora.tasks import MCCollator, MCDataset, get_task, option_token_ids
from blob_lora.tasks.examples import MAX_OPTIONS, MIN_OPTIONS, MCExample
from blob_lora.tasks.sources import (
    MMLULocalParser,
    parse_arc_hub,
    parse_arc_local,
    parse_boolq,
    parse_generic,
    parse_mmlu_hub,
    parse_obqa_hub,
    parse_rows,
    parse_winogrande,
)
from blob_lora.utils.errors import BlobLoraError, ConfigError, DataError
from tests.hardening import strategies as S

# long generated strings make hypothesis warn about the size of their repr
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

# Examples per CI run: BYO folders 150, paper-schema files 5 x 60, record parsers 8 x 100,
# raw bytes 100, damaged gzip 40 (1390 in all).
MAX_LENGTH = 128
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tokenizer(assets):
    from blob_lora.models import load_tokenizer

    return load_tokenizer(str(assets.model))


def _line(rec, ascii_only: bool, mangle: int) -> str:
    line = json.dumps(rec, ensure_ascii=ascii_only, allow_nan=True)
    if mangle == 1:
        return line[: len(line) // 2]  # a line cut short
    if mangle == 2:
        return "[" * 5000 + "]" * 5000  # nesting deeper than json's recursion limit
    if mangle == 3:
        return "1" * 5000  # more digits than Python converts
    return line


_mixed = st.lists(
    st.tuples(S.BYO_ROW, st.booleans(), st.sampled_from([0] * 40 + [1, 2, 3])), max_size=6
)
_clean = st.lists(st.tuples(S.VALID_BYO, st.booleans(), st.just(0)), max_size=6)
lines = st.one_of(_clean, _mixed)  # half the files hold only well-formed (if odd) records


def _check_valid(task, split: str, tokenizer, cache: Path, n_lines: int) -> None:
    """Everything a training run does with the records works, and the counts add up."""
    ds = MCDataset(task, split, tokenizer, MAX_LENGTH, cache_dir=cache)
    event(f"valid split, {'empty' if not len(ds) else 'with examples'}")
    assert len(ds) == n_lines
    option_ids = option_token_ids(tokenizer, task)
    assert len(option_ids) == task.n_options
    for i in range(len(ds)):
        item = ds[i]
        assert MIN_OPTIONS <= item["n_options"] <= task.n_options
        assert 0 <= item["label"] < item["n_options"]
        assert 0 < len(item["input_ids"]) <= MAX_LENGTH
    if len(ds):
        batch = MCCollator(tokenizer.pad_token_id, task.n_options)([ds[i] for i in range(len(ds))])
        assert batch["option_mask"].sum(1).min() >= MIN_OPTIONS


def _no_partial_files(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*") if p.is_file()], "temporary file left behind"


def _expect_clear_error(exc: BaseException, folder: Path) -> None:
    event(f"refused: {type(exc).__name__}")
    assert isinstance(exc, DataError | ConfigError), repr(exc)
    assert isinstance(exc, ValueError)
    if isinstance(exc, DataError) and "line" in str(exc):
        assert str(folder) in str(exc)


@settings(FAST, max_examples=150)
@given(train=lines, valid=lines)
def test_byo_folder(tokenizer, train, valid) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "task", Path(tmp) / "cache"
        folder.mkdir()
        for name, rows in (("train", train), ("validation", valid)):
            if rows:
                text = "".join(_line(r, a, m) + "\n" for r, a, m in rows)
                (folder / f"{name}.jsonl").write_text(
                    text, encoding="utf-8", errors="surrogatepass"
                )
        try:
            task = get_task(str(folder))
            _check_valid(task, "eval", tokenizer, cache, len(valid))
            if train:
                _check_valid(task, "train", tokenizer, cache, len(train))
        except BlobLoraError as exc:
            _expect_clear_error(exc, folder)
        if cache.exists():
            _no_partial_files(cache)


PAPER = {
    "arc_easy": ("arc_easy", S.ARC_LOCAL),
    "openbookqa": ("openbookqa", S.ARC_LOCAL),
    "winogrande_s": ("winogrande", S.WINOGRANDE),
    "boolq": ("boolq", S.BOOLQ),
    "mmlu:anatomy": ("mmlu", S.MMLU_LOCAL),
}


@pytest.mark.parametrize("task_name", list(PAPER))
def test_paper_schema_files(tokenizer, task_name) -> None:
    folder_name, strategy = PAPER[task_name]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows=st.lists(st.tuples(strategy, st.booleans()), max_size=5))
    def check(rows) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "data"
            (root / folder_name).mkdir(parents=True)
            text = "".join(json.dumps(r, ensure_ascii=a) + "\n" for r, a in rows)
            # ensure_ascii=False can emit lone surrogates: write them as the invalid UTF-8 a
            # broken file would hold, so the reader's error path is what gets tested.
            for split in ("validation", "test"):  # test: MMLU's eval split
                (root / folder_name / f"{split}.jsonl").write_text(
                    text, encoding="utf-8", errors="surrogatepass"
                )
            try:
                task = get_task(task_name, data_root=root)
                examples = task.load("eval")
                if task_name.startswith("mmlu:"):
                    assert len(examples) <= len(rows)  # other subjects are skipped
                    n = len(examples)
                else:
                    n = len(rows)
                _check_valid(task, "eval", tokenizer, Path(tmp) / "cache", n)
            except BlobLoraError as exc:
                _expect_clear_error(exc, root)

    check()


def _valid_example(ex: MCExample) -> None:
    assert isinstance(ex.id, str) and isinstance(ex.question, str)
    assert MIN_OPTIONS <= len(ex.choices) <= MAX_OPTIONS
    assert all(isinstance(c, str) for c in ex.choices)
    assert 0 <= ex.label < len(ex.choices)
    assert ex.context is None or isinstance(ex.context, str)
    for t in (ex.id, ex.question, *ex.choices, ex.context or ""):
        t.encode("utf-8")  # no lone surrogates reach a tokenizer


PARSERS = {
    "generic": (parse_generic, S.BYO),
    "arc_local": (parse_arc_local, S.ARC_LOCAL),
    "arc_hub": (parse_arc_hub, S.ARC_HUB),
    "obqa_hub": (parse_obqa_hub, S.OBQA_HUB),
    "winogrande": (parse_winogrande, S.WINOGRANDE),
    "boolq": (parse_boolq, S.BOOLQ),
    "mmlu_local": (MMLULocalParser("anatomy"), S.MMLU_LOCAL),
    "mmlu_hub": (parse_mmlu_hub, S.MMLU_HUB),
}


@pytest.mark.parametrize("schema", list(PARSERS))
def test_record_parsers(schema) -> None:
    """Hub rows are parsed by the same functions (no file): any record is an example or a
    DataError naming the row."""
    parser, strategy = PARSERS[schema]

    @settings(max_examples=100, deadline=None)
    @given(rec=st.one_of(strategy, S.json_values))
    def check(rec) -> None:
        try:
            out = parse_rows([(7, rec)], parser, "hf://x", "id-", "row")
        except DataError as exc:
            assert str(exc).startswith("hf://x, row 7: "), str(exc)
            event("refused")
            return
        event("parsed" if out else "skipped")
        for ex in out:
            _valid_example(ex)

    check()


@FAST
@given(data=st.lists(st.binary(max_size=60), max_size=4), gz=st.booleans())
@example(data=[b"\x1c"], gz=False)  # str.strip() calls it blank; it is a line of bad JSON
@example(data=[b"\xc2\x85", b" \t\r"], gz=False)  # U+0085 (NEL) likewise; the second is blank
def test_raw_bytes(tokenizer, data, gz) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "task"
        folder.mkdir()
        blob = b"\n".join(data)
        if gz:
            (folder / "validation.jsonl.gz").write_bytes(blob)  # not gzip at all
        else:
            (folder / "validation.jsonl").write_bytes(blob)
        try:
            task = get_task(str(folder))
            _check_valid(
                task, "eval", tokenizer, Path(tmp) / "c", sum(bool(x.strip()) for x in data)
            )
        except BlobLoraError as exc:
            _expect_clear_error(exc, folder)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(1, 200), flip=st.integers(0, 255))
def test_damaged_gzip(cut, flip) -> None:
    good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}) + "\n"
    blob = bytearray(gzip.compress((good * 20).encode()))
    blob[min(cut, len(blob) - 1)] ^= flip
    blob = bytes(blob[: len(blob) - cut % 7])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "validation.jsonl.gz").write_bytes(blob)
        try:
            examples = get_task(tmp).load("eval")
        except DataError as exc:
            assert tmp in str(exc)
        else:
            assert len(examples) <= 20


def test_specific_cases_found_by_fuzzing(tmp_path, tokenizer) -> None:
    """The inputs that used to escape as library tracebacks, pinned."""
    cases = {
        '{"question": "a\\ud800", "choices": ["x", "y"], "answer": 0}': "lone UTF-16 surrogate",
        "[" * 5000 + "]" * 5000: "invalid JSON",
        "1" * 5000: "invalid JSON",
    }
    for i, (line, needle) in enumerate(cases.items()):
        folder = tmp_path / f"t{i}"
        folder.mkdir()
        (folder / "validation.jsonl").write_text(line + "\n")
        with pytest.raises(DataError, match=needle) as err:
            get_task(str(folder))
        assert f"{folder / 'validation.jsonl'}, line 1: " in str(err.value)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "validation.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 30)
    with pytest.raises(DataError, match="cannot read"):
        get_task(str(tmp_path / "gz"))
    # a byte-order mark at the start of the file (Windows editors) is accepted
    (tmp_path / "bom").mkdir()
    rec = {"question": "q", "choices": ["a", "b"], "answer": "B"}
    (tmp_path / "bom" / "validation.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode())
    assert get_task(str(tmp_path / "bom")).load("eval")[0].label == 1
