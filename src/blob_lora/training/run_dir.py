"""The run folder: what lives where, and refusing to clobber a different run.

Checking and creating are separate steps so that the trainer can refuse a wrong ``--out``
before the (slow) model load, and create the folder only once the model and the data have
been read: a run that fails on bad input leaves no half-made run folder behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from blob_lora.training.config import TrainConfig, setting_differences
from blob_lora.utils.atomic import atomic_write_json, atomic_write_text
from blob_lora.utils.errors import BlobLoraError, ConfigError
from blob_lora.utils.json_file import read_json_object

RUN_CONFIG = "run_config.json"
#: what ``blob-lora meta-train`` writes into its run folder (``pipeline.meta_config``)
META_RUN_CONFIG = "meta_config.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
EVAL_DIR = "eval"
SUMMARY = "summary.json"  # written last: a run (or a composite's sub-run) with it is finished

# Settings that may change on --resume as long as the global batch (batch_size * grad_accum *
# number of processes) stays the same; the trainer checks that against the checkpoint.
BATCH_LAYOUT = ("batch_size", "grad_accum")


def check_run_dir(out: Path, config: dict[str, Any], overwrite: bool, resume: bool) -> bool:
    """Refuse an unusable ``out`` without touching it; return True when a run is to be resumed.

    A folder holding another run is refused unless ``--overwrite`` (start afresh) or
    ``--resume`` with identical training settings (``batch_size``/``grad_accum`` may differ:
    the trainer then requires the same global batch).
    """
    cfg_path = out / RUN_CONFIG
    if out.exists() and not out.is_dir():
        raise BlobLoraError(f"--out {out} exists and is not a folder")
    if (out / META_RUN_CONFIG).is_file():  # as meta-train refuses a train run's folder
        raise BlobLoraError(
            f"{out} holds a meta-train run ({META_RUN_CONFIG}); --overwrite would leave its "
            "files beside a train run: choose another --out (or delete the folder)"
        )
    if cfg_path.is_file():
        if resume:
            previous = read_json_object(cfg_path, BlobLoraError)
            previous = TrainConfig.stored_with_defaults(previous)
            # how the run is scored after training may change too (``compare`` resumes an
            # interrupted run under an experiment file whose evaluation settings were edited)
            allowed = (*TrainConfig.RESUMABLE_CHANGES, *TrainConfig.EVALUATION_ONLY, *BATCH_LAYOUT)
            changed = setting_differences(previous, config, allowed)
            if changed:
                raise ConfigError(
                    f"cannot resume {out}: settings differ from the interrupted run: "
                    + ", ".join(f"{k} ({previous.get(k)!r} -> {config.get(k)!r})" for k in changed)
                )
            return True
        if not overwrite:
            raise BlobLoraError(
                f"{out} already holds a run; pass --resume (resume=True) to continue it or "
                "--overwrite (overwrite=True) to replace it"
            )
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BlobLoraError(
            f"{out} is not empty and holds no blob-lora run; choose another --out or pass "
            "--overwrite (overwrite=True)"
        )
    return False


def check_same_training_data(stored: str | None, now: str, where: Path | str) -> None:
    """Refuse to continue (or to reuse) a run whose training data has changed since it was
    trained: a resumed run would otherwise mix two data sets, and a reused one report results
    of data the user no longer has. ``stored`` ``None``: a run from before the record."""
    if stored is not None and stored != now:
        raise ConfigError(
            f"the training data of {where} has changed since it was trained "
            f"({_short(stored)} -> {_short(now)}); restore the data, or train a new run "
            "(--overwrite / overwrite=True, or another --out)"
        )


def _short(fingerprint: str) -> str:
    """``file:train.jsonl:<12 hex>…|split`` for a message (a digest is 64 hex digits)."""
    head, _, split = fingerprint.partition("|")
    kind, _, rest = head.partition(":")
    name, _, digest = rest.rpartition(":")
    return f"{kind}:{name}:{digest[:12]}|{split}" if kind == "file" else fingerprint


def prepare_run_dir(out: Path, config: dict[str, Any], overwrite: bool, resume: bool) -> bool:
    """Check ``out`` (see ``check_run_dir``), then create it; return True when resuming."""
    resuming = check_run_dir(out, config, overwrite, resume)
    if resuming:
        _check_writable(out)
        return True
    if overwrite and (out / RUN_CONFIG).is_file():  # only ever delete a blob-lora run
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BlobLoraError(f"cannot create the run folder {out}: {exc}") from exc
    _check_writable(out)
    try:
        atomic_write_json(out / RUN_CONFIG, config)
    except OSError as exc:
        raise BlobLoraError(f"cannot write {out / RUN_CONFIG}: {exc}") from exc
    return False


def _check_writable(out: Path) -> None:
    probe = out / ".write-test"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise BlobLoraError(f"cannot write into {out}: {exc}") from exc


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a step log (``train_log.jsonl``, a learning curve) after ``step``:
    a resumed run logs those steps again, from its checkpoint."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))
