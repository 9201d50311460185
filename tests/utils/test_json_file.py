"""read_json_object: every damaged form of a project JSON file becomes the caller's error,
naming the file; a good object comes back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from blob_lora.utils.errors import BlobLoraError, CheckpointError
from blob_lora.utils.json_file import read_json_object


def test_reads_an_object(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"a": 1, "b": [2, 3]}', encoding="utf-8")
    assert read_json_object(path, CheckpointError) == {"a": 1, "b": [2, 3]}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{truncated", "x.json is unreadable or corrupt"),
        (b"\xff\xfe not utf-8", "x.json is unreadable or corrupt"),
        (b"[1, 2]", "x.json must hold a JSON object, got list"),
    ],
)
@pytest.mark.parametrize("error", [CheckpointError, BlobLoraError])
def test_damage_raises_the_callers_error(
    tmp_path: Path, content: bytes, message: str, error: type[Exception]
) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        read_json_object(path, error)


def test_missing_file_is_the_callers_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.json is unreadable"):
        read_json_object(tmp_path / "missing.json", CheckpointError)
