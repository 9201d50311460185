"""Re-open a finished run folder: its settings, base model, method and trained adapter.

Why in ``training``: the run folder is what training writes (``run_dir``), so its reader lives
beside its writer; evaluation, prediction (``Predictor.from_run``) and comparison all build on it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from blob_lora.methods import get_method
from blob_lora.methods.base import Method
from blob_lora.models import check_model_pair, load_model_and_tokenizer
from blob_lora.tasks import get_task, list_tasks
from blob_lora.tasks.dataset import TaskInputs, task_inputs
from blob_lora.training.config import TrainConfig
from blob_lora.training.run_dir import ADAPTER_DIR, RUN_CONFIG, SUMMARY
from blob_lora.utils.errors import CheckpointError, ConfigError, DamagedFileError
from blob_lora.utils.fingerprint import model_fingerprint
from blob_lora.utils.json_file import read_json_object

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn
    from transformers import PreTrainedTokenizerBase


@dataclass
class LoadedRun:
    config: TrainConfig
    method: Method
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase

    def split_inputs(self, split: str) -> TaskInputs:
        """A split of the run's task, tokenised and scored as the run was (its scoring, length
        normalisation, max length and cache): what a script that re-reads a run scores."""
        data = self.config.data
        return task_inputs(
            get_task(data.task, data_root=data.data_root),
            split,
            self.tokenizer,
            data.max_length,
            scoring=data.scoring_spec,
            cache_dir=data.cache_dir,
        )


def read_run_config(run_dir: Path) -> TrainConfig:
    """The run's settings, its relative paths made to work from here (:func:`from_here`)."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a blob-lora run folder ({RUN_CONFIG} missing)")
    stored = read_json_object(path, CheckpointError)  # a JSON object, or one clear error
    return from_here(TrainConfig.from_dict(TrainConfig.stored_with_defaults(stored)), run_dir)


def launch_dir(run_dir: Path, stored_out: str) -> Path | None:
    """The folder the run was launched from, read off its own path: ``--out runs/x`` stored,
    the folder found at ``/home/me/proj/runs/x`` now -> ``/home/me/proj``. ``None`` when the
    stored ``--out`` is absolute or is not how the folder's path ends (it was moved)."""
    out = Path(os.path.normpath(stored_out))
    if out.is_absolute() or ".." in out.parts or out == Path("."):
        return None
    here = Path(run_dir).resolve()
    n = len(out.parts)
    if here.parts[-n:] != out.parts:
        return None
    return Path(*here.parts[:-n])


def from_here(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """``cfg`` with its relative ``--model``, ``--task`` and ``--data-root`` folders made to
    work from the current folder, where they exist from the run's launch folder
    (:func:`launch_dir`) and not from here.

    Why: settings store paths as typed (so that run folders and published results hold no
    machine's absolute paths), and a run trained with ``--model tiny --task mine`` from one
    folder and evaluated from another used to look ``tiny`` up on the Hub and call ``mine`` an
    unknown task.
    """
    root = launch_dir(run_dir, cfg.out)
    if root is None or root == Path.cwd().resolve():
        return cfg
    changes = {}
    for key in ("model", "task", "data_root"):
        value = cfg.get(key)
        if not isinstance(value, str) or Path(value).is_absolute() or Path(value).exists():
            continue
        if key == "task" and value.strip().lower() in list_tasks():
            continue  # a registered name, not a folder
        there = root / value
        if there.exists():
            changes[key] = os.path.relpath(there)
    return cfg.replace(**changes) if changes else cfg


def load_run(
    run_dir: str | os.PathLike[str],
    model: str | None = None,
    base_model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> LoadedRun:
    """Base model from the run's ``--model`` (or ``model``; or the caller's ``base_model``
    with its ``tokenizer``), adapter from ``RUN/adapter``."""
    check_model_pair(base_model, tokenizer)
    if model is not None and base_model is not None:
        raise ConfigError("pass model (a name or folder to load) or base_model, not both")
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    adapter = run_dir / ADAPTER_DIR
    if not adapter.is_dir():
        raise CheckpointError(
            f"{run_dir} has no trained adapter yet ({ADAPTER_DIR}/ missing): resume the run with "
            "'blob-lora train --resume' first"
        )
    method = get_method(cfg.method)
    method.check_saved(adapter, cfg)
    from_config = base_model is None and model is None  # the model the run names
    if base_model is None:
        base_model, tokenizer = load_model_and_tokenizer(
            model or cfg.base.model,
            dtype=cfg.base.dtype,
            load_in_8bit=cfg.base.load_in_8bit,
            load_in_4bit=cfg.base.load_in_4bit,
            trust_remote_code=cfg.base.trust_remote_code,
        )
    _warn_other_base(run_dir, base_model)
    try:
        peft_model = method.load(base_model, adapter)
    except DamagedFileError:
        raise  # the file itself: another base model would not load it either
    except CheckpointError as exc:
        if not from_config:
            raise
        raise CheckpointError(
            f"{exc}. The run names the base model {cfg.base.model!r} (run_config.json); if it "
            "was trained on another (a model passed to blob_lora.train, or a folder that "
            "moved), give that one: --model / model="
        ) from exc
    return LoadedRun(cfg, method, peft_model, tokenizer)


def _warn_other_base(run_dir: Path, base_model: nn.Module) -> None:
    """Warn when ``base_model``'s weights are not those the run trained on (summary.json's
    ``base_model`` fingerprint): an adapter of the right shapes loads on any model of the same
    architecture, and would then predict something else than the run measured. A warning, not
    an error: a base saved again in another format may legitimately differ in its last bits."""
    try:
        recorded = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8")).get("base_model")
    except (OSError, ValueError, AttributeError):
        return  # an unfinished or older run: nothing recorded to compare with
    if recorded and recorded != model_fingerprint(base_model):
        warnings.warn(
            f"the base model's weights are not the ones {run_dir} was trained on (another "
            "model of the same shapes?): its predictions will not be the run's",
            UserWarning,
            stacklevel=3,
        )
