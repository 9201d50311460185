"""Run a composite method (``blob_lora.methods.composite``): sub-runs, assembly, evaluation.

The method declares its sub-runs and its assembly step; this module runs them the same way for
every composite method: claim the run folder, train the sub-runs with the plain pipeline (a
finished one is reused, an interrupted one resumed), assemble ``RUN/adapter/`` on the main
process, reload it on the others, then evaluate and write summary.json as for a plain run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from blob_lora.methods import METHODS, get_method
from blob_lora.methods.composite import SHARED_FROM, Assembly, CompositeMethod, SubRun
from blob_lora.methods.ensemble import EnsembleConfig
from blob_lora.models.loading import empty_model, load_config, to_device
from blob_lora.pipeline.evaluate import evaluate_run_tasks
from blob_lora.pipeline.plain import train_plain
from blob_lora.training.config import TrainConfig, setting_differences
from blob_lora.training.distributed import fsdp_requested, on_main, process_state
from blob_lora.training.run_dir import (
    ADAPTER_DIR,
    RUN_CONFIG,
    SUMMARY,
    TRAIN_LOG,
    check_run_dir,
    check_same_training_data,
    prepare_run_dir,
)
from blob_lora.training.setup import (
    build_model,
    check_evaluation_inputs,
    load_tokenizer_of,
    training_data,
)
from blob_lora.training.trainer import RunStart
from blob_lora.tuners.lora import refuse_adapter
from blob_lora.utils.atomic import atomic_directory, atomic_write_json
from blob_lora.utils.errors import BlobLoraError, CheckpointError, ConfigError
from blob_lora.utils.json_file import read_json_object

if TYPE_CHECKING:
    from accelerate import PartialState
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def train_composite(cfg: TrainConfig, method: CompositeMethod, start: RunStart) -> dict[str, Any]:
    """Train ``method``'s sub-runs into ``cfg.out``, assemble its adapter, evaluate it."""
    refuse_under_fsdp(cfg)
    out = Path(cfg.out)
    sub_runs = method.sub_runs(cfg)
    # the sub-runs are not evaluated: the assembled model's evaluation splits are checked here
    check_evaluation_inputs(cfg, start.tokenizer or load_tokenizer_of(cfg))
    check_sub_models(cfg, method, sub_runs, start)
    state, claim = claim_run_dir(cfg, overwrite=start.overwrite, resume=start.resume)
    progress = start.progress

    def share() -> None:
        for sub in sub_runs:
            share_finished_run(cfg, out / sub.folder, sub.overrides, start.finished_runs)

    try:
        on_main(state, share, patient=True)  # copying runs of a large model may take a while
        sub_summaries = [
            train_sub_run(cfg, out / sub.folder, start, **sub.overrides) for sub in sub_runs
        ]
    except BaseException:
        if state.is_main_process:
            if any((out / sub.folder).exists() for sub in sub_runs):
                claim.settle()  # a sub-run began: --resume continues it
            else:
                claim.release()  # bad input (or a stop) before any training: as if never run
        raise
    if state.is_main_process:
        claim.settle()
    base, tokenizer = load_base(cfg, start)
    model: nn.Module | None = None  # built on the main process by the assembly, not sent

    def assemble() -> dict[str, Any]:
        nonlocal model
        # an assembly killed half-way (a Laplace fit, a TFB search) left its temporary folder;
        # only this run's main process writes here, so no other writer's folder is removed
        for stale in out.glob(f".{ADAPTER_DIR}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_directory(out / ADAPTER_DIR) as tmp:
            assembly = Assembly(
                cfg=cfg,
                base=base,
                tokenizer=tokenizer,
                sub_adapters=[out / sub.folder / ADAPTER_DIR for sub in sub_runs],
                adapter_dir=tmp,
                device=state.device,
                progress=progress,
            )
            model, assembly_record = method.assemble(assembly)
        return assembly_record

    # a Laplace fit or a TFB search of a large model can outlast the process group's timeout;
    # every process gets the main one's record (a JSON-able dict), so their summaries agree
    record = on_main(state, assemble, patient=True)
    if model is None:
        model = method.load(base, out / ADAPTER_DIR)
    summary = method.summarize(cfg, sub_summaries, record)
    for key in ("train_data", "base_model"):  # what compare and load_run check a run against
        values = {sub.get(key) for sub in sub_summaries} - {None}
        if len(values) == 1:
            summary.setdefault(key, values.pop())
    summary["evaluations"] = evaluate_assembled(model, method, tokenizer, cfg, progress=progress)
    return write_summary(cfg, summary)


def check_sub_models(
    cfg: TrainConfig, method: CompositeMethod, sub_runs: list[SubRun], start: RunStart
) -> None:
    """Build each sub-run's model on the meta device (no weights, no memory) and let the
    method refuse it, before the run folder is claimed and any sub-run trains.

    A model whose empty copy cannot be built here (a Hub name without the network, a class
    the Auto classes do not know) is not checked: the sub-run then loads it as before, and
    the assembly refuses what it cannot use, only later."""
    if not method.checks_sub_models:
        return
    for sub in sub_runs:
        sub_cfg = sub_run_config(cfg, Path(cfg.out) / sub.folder, sub.overrides)
        empty = _meta_model(cfg, start)
        if empty is None:
            return
        try:
            model = get_method(sub_cfg.method).build(empty, sub_cfg)
        except ValueError as exc:  # PEFT: no module matches --target-modules, ...
            what = f"a {sub_cfg.method} adapter"
            refuse_adapter(exc, what, cfg.base.model, cfg.lora.target_modules)
        method.check_sub_model(model)


def _meta_model(cfg: TrainConfig, start: RunStart) -> nn.Module | None:
    """An empty copy of the base model on the meta device, or ``None`` where none can be
    built without loading it (see :func:`check_sub_models`)."""
    trust = cfg.base.trust_remote_code
    try:
        if start.base_model is not None:  # the caller's class, whatever the Auto classes know
            with torch.device("meta"):
                return type(start.base_model)(start.base_model.config)
        return empty_model(load_config(cfg.base.model, trust_remote_code=trust), trust)
    except (BlobLoraError, OSError, ValueError, TypeError) as exc:
        logger.info("no pre-flight check of the sub-runs' adapters (%s)", exc)
        return None


def refuse_under_fsdp(cfg: TrainConfig) -> None:
    """Refuse a composite method launched for FSDP, before anything is written: its assembly
    and evaluation hold the whole base model in every process, which FSDP is there to avoid."""
    if not fsdp_requested():
        return
    shardable = ", ".join(
        name
        for name, m in METHODS.items()
        if not isinstance(m, CompositeMethod) and not m.meta_learned and m.fsdp_refusal is None
    )
    raise ConfigError(
        f"--method {cfg.method} is not supported under FSDP: it assembles and evaluates its "
        "adapters on the whole base model in every process, which FSDP is there to avoid. "
        "Launch it with plain data parallelism (accelerate launch --multi_gpu), or shard a "
        f"method trained by the loop alone ({shardable}) under FSDP"
    )


@dataclass
class Claim:
    """What claiming a composite's run folder changed, to be undone if no sub-run begins.

    A composite run creates its folder before its sub-runs read the model and the data (a plain
    run reads them first), so bad input (a malformed data row, settings a sub-run refuses)
    would otherwise leave a "run" that ``--resume`` cannot continue, and, under
    ``--overwrite``, would already have deleted the run it was to replace. So the replaced run
    is only set aside (a hidden sibling folder), and deleted once a sub-run has begun."""

    out: Path
    existed: bool
    resumed: bool
    set_aside: Path | None = None

    def release(self) -> None:
        """Undo the claim: remove the settings file it wrote, and the folder if it made it;
        put a replaced run back. A resumed run's folder is left as it was."""
        if self.resumed:
            return
        (self.out / RUN_CONFIG).unlink(missing_ok=True)
        if any(self.out.iterdir()):
            return  # files the claim did not write (a non-run folder under --overwrite)
        if self.set_aside is not None:
            self.out.rmdir()
            os.replace(self.set_aside, self.out)
            self.set_aside = None
        elif not self.existed:
            self.out.rmdir()

    def settle(self) -> None:
        """A sub-run has begun: the replaced run is gone for good."""
        if self.set_aside is not None:
            shutil.rmtree(self.set_aside)
            self.set_aside = None


def claim_run_dir(cfg: TrainConfig, *, overwrite: bool, resume: bool) -> tuple[PartialState, Claim]:
    """Create (or reuse, on ``resume``) ``cfg.out`` on the main process, a run it replaces
    (``overwrite``) set aside rather than deleted; the state and the :class:`Claim`."""
    state = process_state()
    out = Path(cfg.out)
    claim = Claim(out, existed=out.exists(), resumed=False)
    if state.is_main_process:
        config = cfg.to_dict()
        claim.resumed = check_run_dir(out, config, overwrite=overwrite, resume=resume)
        if overwrite and not claim.resumed and (out / RUN_CONFIG).is_file():
            claim.set_aside = out.with_name(f".{out.name}.replaced")
            if claim.set_aside.exists():
                shutil.rmtree(claim.set_aside)  # left by a replacement that was killed
            os.replace(out, claim.set_aside)
        try:
            prepare_run_dir(out, config, overwrite=False, resume=claim.resumed)
        except BaseException:
            if claim.set_aside is not None:  # the new folder could not be made: undo
                if out.is_dir() and not any(out.iterdir()):
                    out.rmdir()
                if not out.exists():
                    os.replace(claim.set_aside, out)
            raise
    state.wait_for_everyone()
    return state, claim


def train_sub_run(
    cfg: TrainConfig, sub_dir: Path, start: RunStart, **overrides: Any
) -> dict[str, Any]:
    """Train one ordinary run into ``sub_dir`` (no evaluation) and return its summary.

    A finished sub-run (``summary.json`` present) is reused; an interrupted one (its
    ``run_config.json`` present) is resumed from its last checkpoint. The sub-run can only
    exist when the parent run is being resumed: otherwise the parent folder was fresh. The
    caller's base model (``start.base_model``) is deep-copied, because PEFT injects its layers
    into the model it wraps.
    """
    sub_dir = Path(sub_dir)
    summary_path = sub_dir / SUMMARY
    sub_cfg = sub_run_config(cfg, sub_dir, overrides)
    if summary_path.is_file():
        summary = read_summary(sub_dir)
        check_same_training_data(summary.get("train_data"), training_data(sub_cfg), sub_dir)
        return summary
    method = get_method(sub_cfg.method)
    if isinstance(method, CompositeMethod):
        raise ConfigError(f"a sub-run cannot itself be composite ({sub_cfg.method})")
    base = copy.deepcopy(start.base_model) if start.base_model is not None else None
    sub_start = replace(
        start, overwrite=False, resume=(sub_dir / RUN_CONFIG).is_file(), base_model=base
    )
    return train_plain(sub_cfg, method, start=sub_start)


def sub_run_config(cfg: TrainConfig, sub_dir: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The settings a sub-run trains with: the composite run's, written into ``sub_dir``, not
    evaluated, with the sub-run's ``overrides``."""
    return cfg.replace(out=str(sub_dir), evaluate=False, eval_tasks=[], **overrides)


#: settings that do not change what a run learns (``TrainConfig.NOT_LEARNED``: where it is
#: written, its caches, logging and learning curve, where the data is read from), and how it
#: is evaluated (a sub-run never is)
NOT_TRAINING = frozenset({*TrainConfig.NOT_LEARNED, *TrainConfig.EVALUATION_ONLY})


def training_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Settings of a stored run (``run_config.json``) that would make it learn something
    other than a run with ``wanted`` (a ``TrainConfig.to_dict()`` of a plain run), each as its
    method trains it (``Method.training_settings``: a MAP run whose decay rounds away is plain
    LoRA). The ensemble section is read only by the composite methods, never by the runs they
    train."""
    previous = _as_trained(TrainConfig.stored_with_defaults(stored))
    wanted = _as_trained(wanted)
    changed = setting_differences(previous, wanted, NOT_TRAINING)
    return [k for k in changed if not k.startswith(EnsembleConfig.KEY_PREFIX)]


def _as_trained(settings: dict[str, Any]) -> dict[str, Any]:
    method = METHODS.get(str(settings.get("method")))
    return method.training_settings(settings) if method is not None else settings


def share_finished_run(
    cfg: TrainConfig, sub_dir: Path, overrides: dict[str, Any], finished: Sequence[Path]
) -> bool:
    """Fill a sub-run that has not started from the first run of ``finished`` that trained
    exactly as it would (:func:`training_differences` empty; the run's summary and adapter
    present): its adapter, settings, summary and training log are copied into ``sub_dir`` in
    one atomic step, and the summary records where they came from (``SHARED_FROM``). Returns
    whether it did. Why: an experiment that has the plain LoRA run of a seed need not train
    it again as an ensemble's member (``--ensemble-share-seed``); the copy keeps the
    composite run a self-contained folder."""
    sub_dir = Path(sub_dir)
    if sub_dir.exists() or not finished:
        return False
    wanted = sub_run_config(cfg, sub_dir, overrides).to_dict()
    for run in finished:
        run = Path(run)
        if not (run / SUMMARY).is_file() or not (run / ADAPTER_DIR).is_dir():
            continue
        try:
            stored = read_json_object(run / RUN_CONFIG, CheckpointError)
        except CheckpointError:  # not a run this can reuse; training the sub-run is safe
            continue
        if training_differences(stored, wanted):
            continue
        summary = read_summary(run)
        summary[SHARED_FROM] = os.path.relpath(run, sub_dir)
        with atomic_directory(sub_dir) as tmp:
            shutil.copytree(run / ADAPTER_DIR, tmp / ADAPTER_DIR)
            shutil.copy2(run / RUN_CONFIG, tmp / RUN_CONFIG)
            if (run / TRAIN_LOG).is_file():
                shutil.copy2(run / TRAIN_LOG, tmp / TRAIN_LOG)
            atomic_write_json(tmp / SUMMARY, summary)
        return True
    return False


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is missing or corrupt: {exc}") from exc


def load_base(cfg: TrainConfig, start: RunStart) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The base model for the assembled predictive: the caller's, else ``cfg.base.model``."""
    if start.base_model is not None:
        return start.base_model, start.tokenizer
    return build_model(cfg)


def evaluate_assembled(
    model: nn.Module,
    method: CompositeMethod,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TrainConfig,
    *,
    progress: bool,
) -> dict[str, Any]:
    """Evaluate the assembled model as a plain run is evaluated (own task + extras), with
    its weight samples seeded by the run's seed.

    Why seeded here and not in a plain run: a plain run's evaluation continues the training's
    own seeded stream, restored with its checkpoints; a composite's follows sub-runs that may
    have been copied (``--reuse``) or finished in an earlier sitting, so the generator would
    hold whatever the process started with, and the same run would report other numbers.
    """
    if not cfg.evaluation.evaluate:
        return {}
    from accelerate import Accelerator

    accelerator = Accelerator()
    to_device(model, accelerator.device)
    return evaluate_run_tasks(
        model,
        method,
        tokenizer,
        cfg,
        accelerator=accelerator,
        progress=progress,
        seed=cfg.loop.seed,
    )


def write_summary(cfg: TrainConfig, summary: dict[str, Any]) -> dict[str, Any]:
    if process_state().is_main_process:
        atomic_write_json(Path(cfg.out) / SUMMARY, summary)
    return summary
