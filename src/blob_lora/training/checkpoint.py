"""Training-state checkpoints that are never half-written and never unpickled.

A checkpoint is a folder ``checkpoints/step-XXXXXXXX`` holding:

* ``trainable.safetensors``: every trainable tensor by parameter name;
* ``optim.safetensors`` + ``optim.json``: optimiser/scheduler states split into tensors and
  plain JSON (so loading runs no pickle);
* ``rng.safetensors`` + ``state.json``: RNG states of every process and the loop position;
* ``method.safetensors`` (only when the method keeps training state of its own, e.g. SWAG's
  moments; ``Method.training_state``);
* ``manifest.json``: SHA-256 of each file, written last.

The folder is built under a temporary name and renamed into place, then ``checkpoints/latest``
is atomically pointed at it. A folder without a matching manifest is never loaded: resuming
falls back to the newest intact checkpoint (with a warning naming the skipped one), or fails
with ``CheckpointError`` when none is intact. A write that fails (full disk, unwritable folder)
raises ``CheckpointError`` and leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blob_lora.utils.atomic import atomic_directory, atomic_write_text
from blob_lora.utils.errors import CheckpointError
from blob_lora.utils.json_file import read_json_object

MANIFEST = "manifest.json"
METHOD_FILE = "method.safetensors"
LATEST = "latest"
_NAME = re.compile(r"^step-\d{8,}$")

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested state dict by references, collecting them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_key_to_json(k), _split_tensors(v, f"{prefix}.{k}" if prefix else str(k), tensors)]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, list | tuple):
        items = [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r}")


def _key_to_json(key: Any) -> Any:
    if isinstance(key, int | str):
        return key
    raise TypeError(f"unsupported state-dict key {key!r}")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_rng_to_json(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_checkpoint(
    checkpoint_root: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    loop_state: dict[str, Any],
    keep: int = 2,
    method_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint for ``step`` and point ``latest`` at it.

    Raises ``CheckpointError`` when the disk refuses the write; the checkpoints written
    before stay complete and ``latest`` keeps pointing at the newest of them.
    """
    name = f"step-{step:08d}"
    final = checkpoint_root / name
    try:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(checkpoint_root)
        with atomic_directory(final) as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                tmp / "trainable.safetensors",
            )
            for stem, obj in (("optim", optim_state), ("rng", rng_states)):
                tensors: dict[str, torch.Tensor] = {}
                skeleton = _split_tensors(obj, "", tensors)
                save_file(tensors, tmp / f"{stem}.safetensors")
                (tmp / f"{stem}.json").write_text(json.dumps(skeleton))
            if method_state:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in method_state.items()},
                    tmp / METHOD_FILE,
                )
            (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}, indent=2))
            manifest = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=2))
        atomic_write_text(checkpoint_root / LATEST, name + "\n")
    except (OSError, SafetensorError) as exc:
        previous = _pointer_target(checkpoint_root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier one"
        raise CheckpointError(
            f"could not write checkpoint {final} ({_reason(exc)}); {kept}. Free disk space or "
            "fix the folder's permissions, then continue with --resume"
        ) from exc
    _prune(checkpoint_root, keep=keep, protect=name)
    return final


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _remove_stale_temporaries(root: Path) -> None:
    """Delete ``.step-*`` leftovers of writes that a kill interrupted (never a real checkpoint)."""
    for stale in root.glob(".step-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _pointer_target(root: Path) -> Path | None:
    """The folder ``latest`` names, if the pointer is readable and names a checkpoint folder."""
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if _NAME.match(name) else None


def _prune(root: Path, keep: int, protect: str) -> None:
    """Keep the ``keep`` newest checkpoints up to ``protect``; folders of later steps are
    damaged leftovers that a resume skipped, so they go too."""
    current = int(protect[5:])
    steps = sorted(
        (p for p in root.glob("step-*") if p.is_dir() and _NAME.match(p.name)),
        key=lambda p: int(p.name[5:]),
    )
    older = [p for p in steps if int(p.name[5:]) <= current]
    for old in [p for p in steps if int(p.name[5:]) > current] + older[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest and every digest; raise ``CheckpointError`` on any mismatch."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: incomplete checkpoint")
    manifest = read_json_object(manifest_path, CheckpointError)
    files = manifest.get("files")
    required = {"trainable.safetensors", "optim.safetensors", "optim.json", "rng.safetensors"}
    required |= {"rng.json", "state.json"}
    if not isinstance(files, dict) or not required <= set(files):
        raise CheckpointError(f"{manifest_path} is corrupt: it does not list every file")
    for fname, digest in files.items():
        f = path / str(fname)
        if "/" in str(fname) or not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {fname}")
        try:
            actual = _sha256(f)
        except OSError as exc:
            raise CheckpointError(f"checkpoint file {f} is unreadable: {exc}") from exc
        if actual != digest:
            raise CheckpointError(f"checkpoint file {f} does not match its checksum (corrupt)")
    return manifest


def check_fits(path: Path, params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """``CheckpointError`` unless the checkpoint at ``path`` holds exactly the trainable
    tensors ``params`` (by name) with their shapes: resuming another model's or adapter
    layout's run must fail before anything is copied, naming what does not fit."""
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (another base model or adapter "
            f"layout?): {len(unexpected)} saved tensors have no place, e.g. {unexpected[:2]}; "
            f"{len(missing)} trainable tensors are not saved, e.g. {missing[:2]}"
        )
    for name, value in saved.items():
        if params[name].shape != value.shape:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model (made for another base model?): "
                f"{name} has shape {tuple(value.shape)} there, {tuple(params[name].shape)} here"
            )


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    """The newest *verified* checkpoint, or ``None`` when there is none.

    ``latest`` is tried first, then every ``step-*`` folder from the newest down; a folder that
    fails verification (killed mid-write, truncated, edited) is skipped with a warning. Raises
    ``CheckpointError`` when checkpoints exist but none is intact.
    """
    candidates: list[Path] = []
    pointed = _pointer_target(checkpoint_root)
    if pointed is not None:
        candidates.append(pointed)
    if checkpoint_root.is_dir():
        folders = (p for p in checkpoint_root.glob("step-*") if p.is_dir() and _NAME.match(p.name))
        candidates += sorted(folders, key=lambda p: int(p.name[5:]), reverse=True)
    errors: list[str] = []
    seen: set[Path] = set()
    for cand in candidates:
        if cand in seen:
            continue
        seen.add(cand)
        try:
            verify_checkpoint(cand)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        newest = max(seen, key=lambda p: int(p.name[5:]))
        if errors and int(cand.name[5:]) < int(newest.name[5:]):
            log.warning(
                "skipping damaged checkpoint(s): %s; resuming from %s", "; ".join(errors), cand
            )
        return cand
    if errors:
        raise CheckpointError("no intact checkpoint found: " + "; ".join(errors))
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    manifest = verify_checkpoint(path)
    try:
        out: dict[str, Any] = {"trainable": load_file(str(path / "trainable.safetensors"))}
        for stem in ("optim", "rng"):
            tensors = load_file(str(path / f"{stem}.safetensors"))
            skeleton = json.loads((path / f"{stem}.json").read_text())
            out[stem] = _join_tensors(skeleton, tensors)
        out["state"] = json.loads((path / "state.json").read_text())
        listed = METHOD_FILE in manifest["files"]  # verified with the rest when written
        out["method"] = load_file(str(path / METHOD_FILE)) if listed else {}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc
    return out
