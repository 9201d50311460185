"""The paper's reproduction (``paper/``) is scripts, not a package: they import each other as
siblings (``import criterion``, ``from summary import ...``), as when run as
``python paper/publish.py``. Put that folder on ``sys.path`` so the tests import them so too."""

from __future__ import annotations

import sys
from pathlib import Path

PAPER = Path(__file__).resolve().parents[2] / "paper"

if str(PAPER) not in sys.path:
    sys.path.insert(0, str(PAPER))
