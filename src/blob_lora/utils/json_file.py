"""Reading the project's own JSON files back (settings, manifests, run configs): one place that
turns every way such a file can be damaged into the caller's error type, naming the file.

A truncated write, a hand edit or a file from another tool shows up as ``OSError``,
``UnicodeDecodeError``, ``json.JSONDecodeError`` or a JSON value that is not an object; the
caller (a checkpoint, a run folder, an adapter's settings) decides which error class a user
sees, this function makes the words the same everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file when it cannot be read, is not
    JSON, or holds another JSON value than an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
