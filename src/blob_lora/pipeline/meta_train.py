"""``blob-lora meta-train``: ABMLL's global parameters meta-learned over the meta-train tasks
of a collection, saved as a PEFT-style adapter folder.

Each outer step draws ``meta_batch_tasks`` meta-train tasks and, per task, ``k_shot`` support
and ``query_size`` query questions (all by the run's seed and the step), adapts a task
posterior on the support set and steps AdamW on the meta-objective
(``tuners/abmll/meta.py``). The run folder::

    meta_config.json      the protocol (MetaConfig): collection, split seed, k-shot, ...
    tasks.json            which tasks were meta-trained on and which are held out
    adapter/              the global parameters (plain PEFT loads the global mean)
    meta_train_log.jsonl  the meta-objective and its parts per step
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from blob_lora.models.loading import load_model_and_tokenizer
from blob_lora.pipeline.meta_config import MetaConfig
from blob_lora.pipeline.meta_data import MetaSplit, TaskInputsFactory, load_split
from blob_lora.tasks.collection import task_seed
from blob_lora.tasks.scoring import Scoring
from blob_lora.tuners.abmll import AbmllConfig, get_abmll_model
from blob_lora.tuners.abmll.meta import Task, meta_loss
from blob_lora.utils.atomic import atomic_write_json, atomic_write_text
from blob_lora.utils.errors import ConfigError

ADAPTER_DIR = "adapter"
TASKS_FILE = "tasks.json"
LOG_FILE = "meta_train_log.jsonl"


def device_of_choice() -> torch.device:
    """The accelerator when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse a ``--out`` that holds anything unless ``overwrite`` (then it is cleared)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)


def meta_train(
    cfg: MetaConfig,
    out: str | Path,
    abmll: AbmllConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Meta-train ABMLL under ``cfg`` into ``out``; returns the summary written to
    ``tasks.json``. ``model`` / ``tokenizer`` replace loading ``cfg.model`` (tests)."""
    out = Path(out)
    check_out(out, overwrite)
    split = load_split(cfg)  # every task read and checked before the model loads
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype)
    device = device_of_choice()
    torch.manual_seed(cfg.seed)  # the initial A matrices
    peft_model = get_abmll_model(model.to(device), cfg.peft_config(), abmll or AbmllConfig())
    peft_model.train()
    inputs = TaskInputsFactory(
        tokenizer, cfg.max_length, cfg.batch_size, Scoring(cfg.scoring), device
    )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    log = []
    for step in tqdm(range(cfg.meta_steps), desc="meta-train", disable=not progress):
        tasks = draw_tasks(split, cfg, step, inputs)
        loss, parts = meta_loss(peft_model, tasks, seed=cfg.seed * 1_000_003 + step)
        if not torch.isfinite(loss):
            raise ConfigError(
                f"meta-training diverged at step {step} (loss {float(loss)}, parts {parts}): "
                "lower --lr, --abmll-inner-lr or --abmll-beta"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.append({"step": step + 1, "loss": float(loss.detach()), **parts})
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out / ADAPTER_DIR)
    cfg.save(out)
    atomic_write_text(out / LOG_FILE, "".join(json.dumps(row) + "\n" for row in log))
    summary = {**split.names(), "steps": cfg.meta_steps, "final": log[-1] if log else None}
    atomic_write_json(out / TASKS_FILE, summary)
    return summary


def draw_tasks(
    split: MetaSplit, cfg: MetaConfig, step: int, inputs: TaskInputsFactory
) -> list[Task]:
    """The step's tasks and their support / query batches, drawn by the seed and the step
    (also the draws of the multi-task LoRA baseline, ``meta_multitask.py``)."""
    rng = random.Random(cfg.seed * 7_919 + step)
    n = min(cfg.meta_batch_tasks, len(split.train))
    tasks = []
    for pool in rng.sample(split.train, n):
        seed = task_seed(cfg.seed * 100_003 + step, pool.name)
        support, query = pool.draw(cfg.k_shot, cfg.query_size, seed)
        tasks.append(
            Task(inputs.batches(pool, support), inputs.batches(pool, query), inputs.nll(pool))
        )
    return tasks
