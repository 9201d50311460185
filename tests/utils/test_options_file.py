"""The shared settings file of the tuners (``utils/options_file.py``) on a toy options class:
the round trip, and each fault refused with the file named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from blob_lora.utils.errors import CheckpointError, ConfigError
from blob_lora.utils.options_file import OptionsFile


@dataclass
class ToyOptions(
    OptionsFile, file_name="toy_config.json", missing_hint="is not a toy adapter folder"
):
    LABEL: ClassVar[str] = "ToyOptions"

    width: int = 3
    scale: float = 0.5


def test_round_trip_keeps_every_field(tmp_path):
    path = ToyOptions(width=7, scale=0.25).save(tmp_path)
    assert path == tmp_path / "toy_config.json"
    assert ToyOptions.load(tmp_path) == ToyOptions(width=7, scale=0.25)
    assert not list(tmp_path.glob(".*"))  # atomic: no temporary file left behind


def test_unknown_field_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown ToyOptions fields \['depth'\]; known: "):
        ToyOptions.from_dict({"width": 2, "depth": 1})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"toy_config.json not found: .* is not a toy adapter folder"),
        ("{not json", r"toy_config.json is unreadable or corrupt"),
        ("[1, 2]", r"toy_config.json must hold a JSON object, got list"),
        ('{"depth": 1}', r"toy_config.json holds invalid settings: unknown ToyOptions fields"),
    ],
)
def test_bad_files_are_checkpoint_errors_naming_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "toy_config.json").write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match=message):
        ToyOptions.load(tmp_path)
