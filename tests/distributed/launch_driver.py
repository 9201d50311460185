"""Run several ``blob-lora`` commands inside one launched process.

``accelerate launch ... launch_driver.py ARGS.json`` runs every argument list in ARGS.json
with ``blob_lora.cli.main.main`` in turn, so the two processes import torch once for all the
runs of a test module. Exits with the first non-zero status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from blob_lora.cli.main import main

if __name__ == "__main__":
    for argv in json.loads(Path(sys.argv[1]).read_text()):
        rc = main(argv)
        if rc:
            sys.exit(rc)
