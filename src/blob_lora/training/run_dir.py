"""The run folder: what lives where, and refusing to clobber a different run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import BlobLoraError, ConfigError

RUN_CONFIG = "run_config.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
EVAL_DIR = "eval"


def prepare_run_dir(out: Path, config: dict[str, Any], overwrite: bool, resume: bool) -> bool:
    """Create or reuse ``out``; return True when an earlier run is to be resumed.

    A folder holding another run is refused unless ``--overwrite`` (start afresh) or
    ``--resume`` with identical training settings.
    """
    from blob_lora.training.config import TrainConfig

    cfg_path = out / RUN_CONFIG
    if out.exists() and not out.is_dir():
        raise BlobLoraError(f"--out {out} exists and is not a folder")
    if cfg_path.is_file():
        if resume:
            try:
                previous = json.loads(cfg_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise BlobLoraError(f"{cfg_path} is corrupt: {exc}") from exc
            changed = sorted(
                k
                for k in set(previous) | set(config)
                if k not in TrainConfig.RESUMABLE_CHANGES and previous.get(k) != config.get(k)
            )
            if changed:
                raise ConfigError(
                    f"cannot resume {out}: settings differ from the interrupted run: "
                    + ", ".join(f"{k} ({previous.get(k)!r} -> {config.get(k)!r})" for k in changed)
                )
            return True
        if not overwrite:
            raise BlobLoraError(
                f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        shutil.rmtree(out)
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BlobLoraError(
            f"{out} is not empty and holds no blob-lora run; choose another --out or pass --overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    _check_writable(out)
    atomic_write_json(cfg_path, config)
    return False


def _check_writable(out: Path) -> None:
    probe = out / ".write-test"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise BlobLoraError(f"cannot write into {out}: {exc}") from exc
