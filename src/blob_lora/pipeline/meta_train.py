"""``blob-lora meta-train``: ABMLL's global parameters meta-learned over the meta-train tasks
of a collection, saved as a PEFT-style adapter folder.

Each outer step draws ``meta_batch_tasks`` meta-train tasks and, per task, ``k_shot`` support
and ``query_size`` query questions (all by the run's seed and the step), adapts a task
posterior on the support set and steps AdamW on the meta-objective
(``tuners/abmll/meta.py``). The finished run folder::

    meta_config.json      the protocol (MetaConfig): collection, split seed, k-shot, ...
    adapter/              the global parameters (plain PEFT loads the global mean)
    meta_train_log.jsonl  the meta-objective and its parts per step
    tasks.json            which tasks were meta-trained on and which are held out, and the
                          wall seconds meta-training took over all its sittings
                          (``train_seconds``, the one thing a resumed run cannot repeat bit
                          for bit); written last: a folder without it is no finished run
                          (meta-evaluate refuses)

While it trains, ``checkpoints/`` holds its checkpoints (``meta_loop.py``: every
``--checkpoint-every`` steps, with the settings and the log so far). The command refuses a
folder that holds a run unless ``--resume`` (continue it from its newest intact checkpoint;
its settings must be the same, and it ends bit-identical to an uninterrupted run) or
``--overwrite`` (start afresh). Nothing is deleted before the new run has finished: an old
finished run stays whole (and ``meta-evaluate``-able) while the new one trains beside it in
``checkpoints/``; an old unfinished run's checkpoints move to ``checkpoints-replaced/`` at the
new run's first checkpoint. At the end the final checkpoint is written, then ``tasks.json`` is
removed, the results written (``adapter/`` atomically), ``tasks.json`` written and only then
the checkpoints (and any replaced run's) deleted: a kill at any moment leaves either a finished
run or one that ``--resume`` finishes from its final checkpoint.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blob_lora.models.loading import load_model_and_tokenizer
from blob_lora.pipeline.meta_config import META_CONFIG_NAME, MetaConfig
from blob_lora.pipeline.meta_data import (
    MetaSplit,
    TaskInputsFactory,
    fit_split,
    load_split,
    short_pools,
)
from blob_lora.pipeline.meta_loop import (
    DEFAULT_CHECKPOINT_EVERY,
    REPLACED,
    Checkpoint,
    OuterLoop,
    check_checkpoint_every,
    has_checkpoints,
    newest_checkpoint,
    outer_optimizer,
    plain_settings,
    settings_changes,
)
from blob_lora.tasks.collection import task_seed
from blob_lora.training.run_dir import CHECKPOINTS, RUN_CONFIG
from blob_lora.tuners.abmll import AbmllConfig, get_abmll_model
from blob_lora.tuners.abmll.meta import Task, meta_loss
from blob_lora.tuners.lora import refuse_adapter
from blob_lora.utils.atomic import (
    atomic_directory,
    atomic_remove,
    atomic_write_json,
    atomic_write_text,
)
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.json_file import read_json_object

ADAPTER_DIR = "adapter"
TASKS_FILE = "tasks.json"
LOG_FILE = "meta_train_log.jsonl"
#: what meta-evaluate writes into a run folder: results of the run a new one replaces
META_EVAL_GLOB = "meta_eval*.json"
ABMLL_PREFIX = "abmll_"


def device_of_choice() -> torch.device:
    """The accelerator when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_settings(cfg: MetaConfig, abmll: AbmllConfig) -> dict[str, Any]:
    """Everything that decides what a run learns, keyed by option name (``abmll_beta``): a
    run resumes only from a checkpoint of exactly these. ``--checkpoint-every`` is not one."""
    abmll_keys = {ABMLL_PREFIX + k: v for k, v in abmll.to_dict().items()}
    return plain_settings({**cfg.to_dict(), **abmll_keys})


def is_finished(out: Path) -> bool:
    """Whether ``out`` holds a finished meta-train run (``tasks.json``, written last)."""
    return (out / TASKS_FILE).is_file()


def holds_meta_run(out: Path) -> bool:
    """Whether ``out`` holds a meta-train run, finished or not (what ``--overwrite`` may
    replace). A ``train`` run folder, which has a ``checkpoints/`` too, is refused before
    this is asked (``check_out``)."""
    names = (TASKS_FILE, META_CONFIG_NAME, CHECKPOINTS, REPLACED)
    return any((out / name).exists() for name in names)


@dataclass(frozen=True)
class RunStart:
    """How a run starts (``check_out``): afresh, from ``resume``, or not at all because
    ``--resume`` found the run ``finished`` (its summary)."""

    resume: Checkpoint | None = None
    finished: dict[str, Any] | None = None


def check_out(out: Path, settings: dict[str, Any], *, overwrite: bool, resume: bool) -> RunStart:
    """Refuse an unusable ``--out`` without touching it; say how the run starts (module doc).

    ``--resume`` continues the newest intact checkpoint when its settings are ``settings``
    (a damaged newer one is skipped with a warning; ``CheckpointError`` when none is intact),
    or finds a finished run of these settings with nothing left to do; a folder with no
    checkpoint is started afresh, as ``train --resume`` does. ``--overwrite`` starts afresh
    over a meta-train run (never over a folder of anything else).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if (out / RUN_CONFIG).exists():
        raise ConfigError(
            f"--out {out} holds a 'blob-lora train' run, no meta-train run; choose another "
            "folder (--overwrite / --resume only take a meta-train run)"
        )
    root = out / CHECKPOINTS
    if resume and has_checkpoints(root):
        found = newest_checkpoint(root)
        if found is not None:
            changes = settings_changes(found.settings, settings)
            if changes:
                raise ConfigError(
                    f"cannot resume {out}: settings differ from its checkpoint "
                    f"{found.path.name}: " + ", ".join(changes)
                )
            return RunStart(resume=found)
    if resume and is_finished(out) and not overwrite:
        changes = settings_changes(_finished_settings(out), settings)
        if changes:
            raise ConfigError(
                f"cannot resume {out}: it holds a finished run of other settings: "
                + ", ".join(changes)
                + "; pass --overwrite to replace it"
            )
        return RunStart(finished=read_json_object(out / TASKS_FILE, ConfigError))
    if not out.is_dir() or not any(out.iterdir()):
        return RunStart()
    if not holds_meta_run(out):
        raise ConfigError(
            f"--out {out} is not empty and holds no meta-train run; choose another folder "
            "(--overwrite only replaces a meta-train run)"
        )
    if overwrite or resume:  # resume: the run stopped before its first checkpoint
        return RunStart()
    if has_checkpoints(root) or not is_finished(out):
        raise ConfigError(
            f"--out {out} holds an unfinished meta-train run; pass --resume to continue it "
            "from its newest checkpoint, or --overwrite to start again"
        )
    raise ConfigError(
        f"--out {out} already holds a finished meta-train run; pass --overwrite to replace it "
        "(it is kept until the new run has finished)"
    )


def _finished_settings(out: Path) -> dict[str, Any]:
    return run_settings(MetaConfig.load(out), AbmllConfig.load(out / ADAPTER_DIR))


def meta_train(
    cfg: MetaConfig,
    out: str | Path,
    abmll: AbmllConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    progress: bool = True,
    prefix_cache: bool = True,
) -> dict[str, Any]:
    """Meta-train ABMLL under ``cfg`` into ``out``; returns the summary written to
    ``tasks.json``. ``overwrite`` / ``resume`` / ``checkpoint_every`` as the module doc says
    (0: no checkpoint while training); ``prefix_cache``: the frozen blocks below the adapters
    run once per support and query batch of a step, not once per inner step (the same losses;
    like ``checkpoint_every`` not a setting of the run, so a run may resume with it switched);
    ``model`` / ``tokenizer`` replace loading ``cfg.model`` (tests)."""
    out = Path(out)
    abmll = abmll or AbmllConfig()
    check_checkpoint_every(checkpoint_every)
    if abmll.std_constant == 0:  # allowed in a layer (c = 0 with B_sigma = 0 is plain LoRA)
        raise ConfigError(
            "--abmll-std-constant must be > 0 to meta-train: with c = 0 every std starts at "
            "0 and the KL between prior and task posterior (log sigma) is not finite"
        )
    start = check_out(out, run_settings(cfg, abmll), overwrite=overwrite, resume=resume)
    if start.finished is not None:
        print(f"{out} is finished: nothing to resume", file=sys.stderr)
        return start.finished
    split = load_split(cfg)  # every task read and checked before the model loads
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype)
    device = device_of_choice()
    inputs = TaskInputsFactory(
        tokenizer, cfg.max_length, cfg.batch_size, cfg.scoring_spec, device, prefix_cache
    )
    split = fit_split(split, inputs, cfg)  # every question fits, or is left out, before step 1
    for line in capped_settings(split, cfg):
        print(f"note: {line}", file=sys.stderr)
    torch.manual_seed(cfg.seed)  # the initial A matrices
    try:
        peft_model = get_abmll_model(model.to(device), cfg.peft_config(), abmll)
    except ValueError as exc:  # PEFT: no module matches --target-modules, unsupported layer
        refuse_adapter(exc, "ABMLL's adapters", cfg.model, cfg.target_modules)
    peft_model.train()
    optimizer = outer_optimizer(peft_model, cfg.lr)
    loop = OuterLoop(
        peft_model,
        optimizer,
        cfg.meta_steps,
        root=out / CHECKPOINTS,
        settings=run_settings(cfg, abmll),
        checkpoint_every=checkpoint_every,
        resume=start.resume,
        progress=progress,
    )

    def step_fn(step: int) -> dict[str, float]:
        tasks = draw_tasks(split, cfg, step, inputs)
        loss, parts = meta_loss(peft_model, tasks, seed=cfg.seed * 1_000_003 + step)
        if not torch.isfinite(loss):
            raise ConfigError(
                f"meta-training diverged at step {step + 1} (loss {float(loss)}, parts {parts}): "
                "lower --lr, --abmll-inner-lr or --abmll-beta"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach()), **parts}

    log = loop.run(step_fn)
    summary = {
        **split.names(),
        "steps": cfg.meta_steps,
        "final": log[-1] if log else None,
        "train_seconds": round(loop.seconds, 1),
    }
    write_run(out, peft_model, cfg, log, summary)
    loop.discard_checkpoints()
    return summary


def write_run(
    out: Path, peft_model: Any, cfg: MetaConfig, log: list[dict[str, Any]], summary: dict
) -> None:
    """The finished run's files, over any run ``out`` held: ``tasks.json`` (the mark of a
    finished run) removed first, with the replaced run's ``meta_eval*.json`` and the temporary
    files of writes a kill cut short, and written last, so that no moment shows a finished run
    whose files are not all this one's."""
    atomic_remove(out / TASKS_FILE)
    for stale in [*out.glob(META_EVAL_GLOB), *out.glob(".*.tmp")]:  # .tmp: writes a kill cut
        atomic_remove(stale)
    with atomic_directory(out / ADAPTER_DIR) as tmp:
        peft_model.save_pretrained(tmp)
    cfg.save(out)
    atomic_write_text(out / LOG_FILE, "".join(json.dumps(row) + "\n" for row in log))
    atomic_write_json(out / TASKS_FILE, summary)


def capped_settings(split: MetaSplit, cfg: MetaConfig) -> list[str]:
    """What the run will do short of what its settings ask (said before step 1, not found
    in the log afterwards): fewer tasks per step than ``--meta-batch-tasks``, fewer query
    questions than ``--query-size`` where a task has too few beyond its support set."""
    lines = []
    if cfg.meta_batch_tasks > len(split.train):
        lines.append(
            f"--meta-batch-tasks {cfg.meta_batch_tasks} but only {len(split.train)} "
            f"meta-train task(s): every step draws {len(split.train)}"
        )
    short = short_pools(split.train, cfg.k_shot, cfg.query_size)
    if short:
        listed = ", ".join(f"{name} {n}" for name, n in short.items())
        lines.append(
            f"--query-size {cfg.query_size} but these tasks have fewer questions beyond the "
            f"--k-shot {cfg.k_shot} support set, so their queries are smaller: {listed}"
        )
    return lines


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
