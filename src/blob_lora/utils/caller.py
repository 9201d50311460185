"""Where a warning of ours should point: the line that called into this package.

A fixed ``stacklevel`` is right for one call path only: ``Predictor(...)`` and the
``predict(...)`` function that builds one reach the same warning at different depths, and a
``torch.no_grad`` decorator on the way adds a frame of torch's. A fixed level names a line of
ours, or of torch, for some of them. Python 3.12's ``skip_file_prefixes`` skips our frames,
not a decorator's; the package supports 3.10.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent.parent)


def outside_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that
    points at the caller of the outermost ``blob_lora`` frame on the stack: the user's line
    (or, from the command line, the console script)."""
    frame = sys._getframe(1)  # the function that is about to warn: stacklevel 1
    level, outermost = 1, 1
    while frame is not None:
        if _inside(frame.f_code.co_filename):
            outermost = level
        frame = frame.f_back
        level += 1
    return min(outermost + 1, level - 1)


def _inside(filename: str) -> bool:
    if filename.startswith("<"):  # "<string>", "<stdin>", frozen modules
        return False
    try:
        path = str(Path(filename).resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an unreadable path
        path = os.path.abspath(filename)
    return path.startswith(_PACKAGE + "/")
