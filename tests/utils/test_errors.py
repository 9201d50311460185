"""The tool's errors survive pickling: ``training.distributed.on_main`` sends an error of the
main process to the others, which rebuild it; an error that cannot be rebuilt arrived there as
an unrelated ``TypeError`` (``OverlongError.__init__() missing 2 required keyword-only
arguments``)."""

from __future__ import annotations

import pickle

from blob_lora.utils.errors import (
    CheckpointError,
    ConfigError,
    DamagedFileError,
    DataError,
    ExampleError,
    OverlongError,
)
from blob_lora.utils.settings import SettingError


def _round_trip(exc: Exception) -> Exception:
    return pickle.loads(pickle.dumps(exc))


def test_every_error_is_rebuilt_with_its_type_message_and_fields() -> None:
    for exc in (
        ConfigError("--lr must be > 0"),
        DataError("train.jsonl line 3: no 'answer'"),
        CheckpointError("step-2 is damaged"),
        DamagedFileError("adapter_model.safetensors is truncated"),
    ):
        again = _round_trip(exc)
        assert type(again) is type(exc) and str(again) == str(exc)
    overlong = _round_trip(OverlongError("q7 needs 300 tokens", example_id="q7", needed=300))
    assert type(overlong) is OverlongError and str(overlong) == "q7 needs 300 tokens"
    assert (overlong.example_id, overlong.needed, overlong.line) == ("q7", 300, None)
    placed = _round_trip(OverlongError("q8", example_id="q8", needed=9, line=4))
    assert (placed.example_id, placed.needed, placed.line) == ("q8", 9, 4)
    example = _round_trip(ExampleError("no text to score", example_id="q9", line=12))
    assert type(example) is ExampleError and str(example) == "no text to score"
    assert (example.example_id, example.line) == ("q9", 12)
    setting = _round_trip(SettingError("--lora-r", "lora_r", "must be >= 1, got 0"))
    assert type(setting) is SettingError and str(setting) == "--lora-r must be >= 1, got 0"
    assert (setting.setting, setting.problem) == ("lora_r", "must be >= 1, got 0")
