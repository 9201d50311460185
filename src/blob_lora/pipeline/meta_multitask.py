"""``multitask-lora``: the simple transfer baseline. A plain LoRA adapter trained on the run's
meta-train tasks pooled, then fitted on each held-out support set exactly as ``lora-support``
(from these weights instead of a fresh adapter). It asks whether ABMLL's meta-learned prior
beats ordinary multi-task training on the same data.

Multi-task training (:func:`train_multitask_lora`) sees what ABMLL's meta-training sees: the
same collection and split, ``meta_steps`` steps, and per step the same ``meta_batch_tasks``
tasks with the same ``k_shot + query_size`` questions each (``meta_train.draw_tasks``, drawn
by the run's seed and the step). The loss is the answer NLL per example of each task, averaged
over the step's tasks (the tasks weighted alike, as ABMLL's meta-objective weights them), and
AdamW at the run's ``lr`` (no weight decay) steps the adapter, initialised under the run's
seed as ABMLL's global parameters are.

Why a ``meta-evaluate --baseline`` of the ABMLL run and not a ``meta-train --method`` of its
own: every number of one comparison must come from one protocol. Trained from the ABMLL run's
own ``meta_config.json`` and fine-tuned with the budget in its ``adapter/abmll_config.json``,
this baseline cannot differ from ABMLL in split, draws, outer budget or fine-tuning budget;
a separate run folder could (another seed, another ``--abmll-inner-steps``), and the tables
would compare it silently. Its results land beside ABMLL's, ``meta_eval_multitask-lora.json``
next to ``meta_eval.json``. The cost, multi-task training inside an evaluation, is paid once:
the weights are kept in the run folder (:data:`MULTITASK_DIR`: ``adapter/``, a plain PEFT LoRA
folder, its ``train_log.jsonl``, and ``trained_under.json``, the run settings it was trained
under, written last), and a later call reuses them while those settings are the run's. Its
training checkpoints as ``meta-train``'s does (``checkpoints/`` in that folder, every
``CHECKPOINT_EVERY`` steps): an evaluation stopped part way through it continues from
there the next time, to the same weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from blob_lora.pipeline.meta_data import MetaRun
from blob_lora.pipeline.meta_loop import (
    OuterLoop,
    has_checkpoints,
    newest_checkpoint,
    outer_optimizer,
    plain_settings,
    settings_changes,
)
from blob_lora.pipeline.meta_train import ADAPTER_DIR, draw_tasks
from blob_lora.training.run_dir import CHECKPOINTS
from blob_lora.tuners.abmll.meta import Task, expected_nll
from blob_lora.tuners.peft_adapter import check_adapter_fits, read_adapter_weights
from blob_lora.utils.atomic import (
    atomic_directory,
    atomic_remove,
    atomic_write_json,
    atomic_write_text,
)
from blob_lora.utils.errors import CheckpointError, ConfigError
from blob_lora.utils.json_file import read_json_object

#: the multi-task weights' folder inside the ABMLL run folder
MULTITASK_DIR = "multitask-lora"
TRAINED_UNDER = "trained_under.json"
LOG_FILE = "train_log.jsonl"

#: steps between checkpoints of the multi-task training: its step is one forward and backward
#: pass per task, ~10x cheaper than a meta-step, so 50 of them take about the time of 5
#: meta-steps (``meta_loop.DEFAULT_CHECKPOINT_EVERY`` explains the costs)
CHECKPOINT_EVERY = 50

logger = logging.getLogger(__name__)


def multitask_weights(
    model: PeftModel, run: MetaRun, progress: bool = False
) -> dict[str, torch.Tensor]:
    """The multi-task weights, loaded into ``model`` (a LoRA adapter of the run's shape,
    fresh from the run's seed) and returned: read from the run folder when they were trained
    under the run's current settings, else trained and saved there.

    Training checkpoints into :data:`MULTITASK_DIR` ``/checkpoints/`` as ``meta-train`` does
    (``meta_loop.py``) and, the weights being a cache of the run's settings, resumes by itself
    from the newest intact checkpoint of these settings (none intact: trained afresh, with a
    warning). ``trained_under.json`` is removed before and written after the weights, then the
    checkpoints go."""
    folder = run.folder / MULTITASK_DIR
    adapter = folder / ADAPTER_DIR
    settings = run.cfg.to_dict()
    if _trained_under(folder) == settings:
        state = read_adapter_weights(adapter)
        check_adapter_fits(model, state, adapter, "default")
        set_peft_model_state_dict(model, state)
    else:
        loop = _loop(model, run, folder / CHECKPOINTS, settings, progress)
        log = train_multitask_lora(model, run, loop=loop)
        atomic_remove(folder / TRAINED_UNDER)  # trained under other settings, or half written
        with atomic_directory(adapter) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        atomic_write_text(folder / LOG_FILE, "".join(json.dumps(r) + "\n" for r in log))
        atomic_write_json(folder / TRAINED_UNDER, settings)  # last: the folder is whole
        loop.discard_checkpoints()
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().clone() for k, v in state.items()}


def _trained_under(folder: Path) -> dict[str, Any] | None:
    """The settings the kept weights were trained under; ``None`` when there are none (or the
    file is damaged: the weights are then trained again)."""
    try:
        return read_json_object(folder / TRAINED_UNDER, ConfigError)
    except ConfigError:
        return None


def _loop(
    model: PeftModel, run: MetaRun, root: Path, settings: dict[str, Any], progress: bool
) -> OuterLoop:
    """The multi-task training's outer loop, from the newest intact checkpoint under ``root``
    that was written under ``settings``, else from the start."""
    resume = None
    try:
        found = newest_checkpoint(root) if has_checkpoints(root) else None
    except CheckpointError as exc:
        logger.warning("multitask-lora: %s; training from the start", exc)
        found = None
    if found is not None and not settings_changes(found.settings, plain_settings(settings)):
        resume = found
    return OuterLoop(
        model,
        outer_optimizer(model, run.cfg.lr),
        run.cfg.meta_steps,
        root=root,
        settings=settings,
        checkpoint_every=CHECKPOINT_EVERY,
        resume=resume,
        desc="multitask-lora",
        progress=progress,
    )


def train_multitask_lora(
    model: PeftModel, run: MetaRun, progress: bool = False, *, loop: OuterLoop | None = None
) -> list[dict[str, float]]:
    """Train ``model``'s adapter on the meta-train tasks pooled (module doc); returns the
    per-step log. ``loop`` (on ``model`` and its optimiser) adds checkpoints and a resumed
    start; without it the training runs in memory from step 0."""
    cfg = run.cfg
    if loop is None:
        loop = OuterLoop(
            model,
            outer_optimizer(model, run.cfg.lr),
            cfg.meta_steps,
            root=None,
            settings=cfg.to_dict(),
            checkpoint_every=0,
            desc="multitask-lora",
            progress=progress,
        )
    optimizer = loop.optimizer
    model.train()

    def step_fn(step: int) -> dict[str, float]:
        tasks = draw_tasks(run.split, cfg, step, run.inputs)
        loss = torch.stack([_task_nll(model, task) for task in tasks]).mean()
        if not torch.isfinite(loss):
            raise ConfigError(f"multi-task LoRA training diverged at step {step} (lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}

    out = loop.run(step_fn)
    model.eval()
    return out


def _task_nll(model: PeftModel, task: Task) -> torch.Tensor:
    """The per-example mean NLL over the task's drawn questions, support and query alike."""
    assert task.nll is not None  # draw_tasks gives every task its own answer tokens
    return expected_nll(model, [*task.support, *task.query], task.nll, 1)
