"""Methods whose training is several ordinary runs plus an assembly step (ensemble, Laplace, TFB).

Why: a deep ensemble is K plain LoRA runs, Laplace-LoRA is a MAP run plus a post-hoc fit, TFB
is a LoRA run plus a post-hoc search. Rather than teach the training loop about each of them,
such a method defines ``train_run(cfg, ...)``; ``training.trainer.train`` hands the whole run
to it. The method trains its sub-runs with the unchanged loop into sub-folders of the run
folder (``RUN/members/<k>/``, ``RUN/map/``, ...), then writes the usual top-level files:

* ``RUN/run_config.json`` with the composite method's name (written first, as for any run),
* ``RUN/adapter/``, which the method's ``load`` turns back into a predictive model,
* ``RUN/eval/<task>/`` and ``RUN/summary.json``, exactly as a plain run.

So ``blob-lora evaluate --run RUN`` and ``load_run`` work unchanged. ``--resume`` skips
finished sub-runs (their ``summary.json`` exists) and resumes an interrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from blob_lora.training.run_dir import RUN_CONFIG, prepare_run_dir
from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import CheckpointError

SUMMARY = "summary.json"


def claim_run_dir(cfg: Any, *, overwrite: bool, resume: bool) -> Any:
    """Create (or reuse, on ``resume``) ``cfg.out`` on the main process; return the state."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        prepare_run_dir(Path(cfg.out), cfg.to_dict(), overwrite=overwrite, resume=resume)
    state.wait_for_everyone()
    return state


def train_sub_run(
    cfg: Any,
    sub_dir: Path,
    *,
    progress: bool,
    base_model: Any = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train one ordinary run into ``sub_dir`` (no evaluation) and return its summary.

    A finished sub-run (``summary.json`` present) is reused; an interrupted one (its
    ``run_config.json`` present) is resumed from its last checkpoint. The sub-run can only
    exist when the parent run is being resumed: otherwise the parent folder was fresh.
    ``base_model`` is deep-copied, because PEFT injects its layers into the model it wraps.
    """
    from blob_lora.training.trainer import train

    sub_dir = Path(sub_dir)
    summary_path = sub_dir / SUMMARY
    if summary_path.is_file():
        return read_summary(sub_dir)
    sub_cfg = replace(cfg, out=str(sub_dir), evaluate=False, eval_tasks=[], **overrides)
    base = copy.deepcopy(base_model) if base_model is not None else None
    return train(
        sub_cfg,
        resume=(sub_dir / RUN_CONFIG).is_file(),
        progress=progress,
        base_model=base,
        tokenizer=tokenizer,
    )


def link_tree(src: Path, dst: Path) -> None:
    """Copy a folder by hard links where the filesystem allows (adapters that target
    ``lm_head`` carry a vocabulary-sized tensor; K copies of it would waste disk)."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is missing or corrupt: {exc}") from exc


def load_base(cfg: Any, base_model: Any = None, tokenizer: Any = None) -> tuple[Any, Any]:
    """The base model for the assembled predictive: the caller's, else ``cfg.model``."""
    if base_model is not None:
        return base_model, tokenizer
    from blob_lora.training.trainer import build_model

    return build_model(cfg)


def to_device(model: Any, device: Any) -> Any:
    """Move a (non-quantised) model to ``device``; quantised models are already placed."""
    if getattr(model, "hf_quantizer", None) is None and not getattr(
        model, "is_loaded_in_8bit", False
    ):
        model.to(device)
    return model


def evaluate_run(
    model: Any, method: Any, tokenizer: Any, cfg: Any, *, progress: bool
) -> dict[str, Any]:
    """Evaluate the assembled model as the trainer evaluates a plain run (own task + extras)."""
    if not cfg.evaluate:
        return {}
    from accelerate import Accelerator

    from blob_lora.evaluation.evaluate import evaluate_run_tasks

    accelerator = Accelerator()
    to_device(model, accelerator.device)
    return evaluate_run_tasks(
        model, method, tokenizer, cfg, accelerator=accelerator, progress=progress
    )


def write_summary(cfg: Any, summary: dict[str, Any]) -> dict[str, Any]:
    from accelerate import PartialState

    if PartialState().is_main_process:
        atomic_write_json(Path(cfg.out) / SUMMARY, summary)
    return summary
