"""Where predictions are written: the output path checked before any model loads, and the rows
written atomically (gzip-compressed under a ``.gz`` name, as ``.jsonl.gz`` input is read).

Why a module of its own: ``blob-lora predict`` and ``Predictor.predict_file`` write the same
file and must refuse the same things, and the CLI has to refuse them before the (slow) load
of the model and the pass over every question, not after.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blob_lora.utils.atomic import atomic_write_bytes
from blob_lora.utils.errors import ConfigError


def check_output_path(
    out: str | os.PathLike[str],
    input_path: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """``out`` as a ``Path``, or ``ConfigError`` when writing it would fail or lose something:
    it is a folder; a folder on its way is a file; it exists but is no regular file (a device,
    a FIFO: the rename would replace it, with ``/dev/null`` for every user of the machine); it
    is the questions' own file (the answers would replace them); it exists and ``overwrite``
    is not given."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a folder")
    if not out.exists():
        return out
    if not out.is_file():  # a device, a FIFO, /dev/stdout: an atomic rename would replace it
        raise ConfigError(
            f"--out {out} is not a regular file; predictions are written to a file (by an "
            "atomic rename, which would replace it): give a file name"
        )
    same = input_path is not None and Path(input_path).exists()
    if same and os.path.samefile(out, input_path):
        raise ConfigError(f"--out {out} is the --input file; writing would replace the questions")
    if not overwrite:
        raise ConfigError(
            f"--out {out} exists; pass --overwrite (overwrite=True) to replace it, or choose "
            "another file"
        )
    return out


def jsonl_text(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as JSON Lines: one object per line, each line ended by a newline."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_rows(out: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> Path:
    """One JSON object per line, written atomically; gzip-compressed when ``out`` ends in
    ``.gz`` (a name that says compressed must hold compressed bytes)."""
    data = jsonl_text(rows).encode("utf-8")
    if str(out).endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime 0: the same rows give the same bytes
    return atomic_write_bytes(out, data)
