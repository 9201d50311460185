"""Composite methods: several ordinary runs plus an assembly step (ensemble, Laplace, TFB).

Why: a deep ensemble is K plain LoRA runs, Laplace-LoRA is a MAP run plus a post-hoc fit, TFB
is a LoRA run plus a post-hoc search. Rather than teach the training loop about each of them,
such a method *declares* its sub-runs (:meth:`CompositeMethod.sub_runs`) and how their adapters
become its own (:meth:`CompositeMethod.assemble`); ``blob_lora.pipeline.composite`` runs that
recipe. It trains the sub-runs with the unchanged loop into sub-folders of the run folder
(``RUN/members/<k>/``, ``RUN/map/``, ...), assembles on the main process, then writes the usual
top-level files:

* ``RUN/run_config.json`` with the composite method's name (written first, as for any run),
* ``RUN/adapter/``, which the method's ``load`` turns back into a predictive model,
* ``RUN/eval/<task>/`` and ``RUN/summary.json``, exactly as a plain run.

So ``blob-lora evaluate --run RUN`` and ``load_run`` work unchanged. ``--resume`` skips
finished sub-runs (their ``summary.json`` exists) and resumes an interrupted one.
"""

from __future__ import annotations

import os
import shutil
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft import PeftModel
from torch import nn

from blob_lora.methods.base import Method, RunSettings
from blob_lora.tasks import TaskInputs, get_task, task_inputs
from blob_lora.utils.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


#: key of a sub-run's summary.json that names the finished run it was taken from (relative to
#: the sub-run's folder) when ``pipeline.composite`` reused one instead of training
SHARED_FROM = "shared_from"


@dataclass(frozen=True)
class SubRun:
    """One ordinary run of a composite method: its folder under the run folder and the
    settings that differ from the composite run's (e.g. ``method``, ``seed``)."""

    folder: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Assembly:
    """What the pipeline hands :meth:`CompositeMethod.assemble` on the main process."""

    cfg: RunSettings
    #: the base model, not wrapped by any adapter yet
    base: nn.Module
    tokenizer: PreTrainedTokenizerBase
    #: each sub-run's trained adapter folder, in the order of ``sub_runs``
    sub_adapters: list[Path]
    #: an empty folder that becomes ``RUN/adapter/`` once ``assemble`` returns
    adapter_dir: Path
    device: torch.device
    progress: bool


class CompositeMethod(Method):
    """A method trained as ordinary sub-runs plus an assembly step (see the module doc).

    Its model is never built for the training loop: :meth:`sub_runs` and :meth:`assemble`
    replace :meth:`Method.build`; :meth:`Method.load` and the prediction hooks are as for any
    method.
    """

    #: whether :meth:`check_sub_model` checks anything (the pipeline then builds each
    #: sub-run's model on the meta device before the run folder is claimed)
    checks_sub_models: ClassVar[bool] = False

    def build(self, base: nn.Module, cfg: RunSettings) -> PeftModel:
        raise ConfigError(
            f"method {self.name!r} is trained as sub-runs plus an assembly step "
            "(blob_lora.pipeline.train), not by the training loop"
        )

    def check_sub_model(self, model: nn.Module) -> None:
        """Refuse (``ConfigError``) a sub-run's model, built on the meta device, that the
        assembly could not use: found before the sub-runs train, not after (hours, for a
        Laplace fit on a target its curvature cannot cover)."""

    @abstractmethod
    def sub_runs(self, cfg: RunSettings) -> list[SubRun]:
        """The ordinary runs to train, in order."""

    @abstractmethod
    def assemble(self, assembly: Assembly) -> tuple[nn.Module | None, dict[str, Any]]:
        """Write this method's adapter into ``assembly.adapter_dir``.

        Returns the predictive model when it was built in memory (``None``: every process
        loads it from ``RUN/adapter/``) and a record of the assembly for the summary (a
        JSON-able dict: the main process sends it to the others).
        """

    @abstractmethod
    def summarize(
        self, cfg: RunSettings, sub_summaries: list[dict[str, Any]], record: dict[str, Any]
    ) -> dict[str, Any]:
        """The run's summary (without ``evaluations``) from its sub-runs' and the record."""


class PostHocMethod(CompositeMethod):
    """One ordinary run plus a post-hoc step on its adapter (Laplace: a posterior fitted to a
    MAP run; TFB: a variance searched for a LoRA run).

    The run is method :attr:`sub_method` in ``RUN/<sub_method>/``; ``assemble`` writes the
    step's record to ``RUN/adapter/<info_file>``, whose :attr:`step_seconds` entry is the
    step's time. The summary is the run's, under this method's name, with both times added
    and the record under the method's name.
    """

    #: the ordinary run's method, trained into the folder of the same name
    sub_method: ClassVar[str]
    #: the record of the post-hoc step, in ``RUN/adapter/``
    info_file: ClassVar[str]
    #: the record's entry for the step's time in seconds
    step_seconds: ClassVar[str]

    def sub_runs(self, cfg: RunSettings) -> list[SubRun]:
        return [SubRun(self.sub_method, {"method": self.sub_method})]

    def summarize(
        self, cfg: RunSettings, sub_summaries: list[dict[str, Any]], record: dict[str, Any]
    ) -> dict[str, Any]:
        (sub_summary,) = sub_summaries
        train_seconds = sub_summary["train_seconds"] + record[self.step_seconds]
        return {
            **{k: v for k, v in sub_summary.items() if k != "evaluations"},
            "method": self.name,
            "train_seconds": round(train_seconds, 3),
            f"{self.sub_method}_train_seconds": sub_summary["train_seconds"],
            self.name: record,
        }


def training_split_inputs(
    cfg: RunSettings, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[str, TaskInputs]:
    """The run's training split (its name and tokenised inputs), for an assembly step that
    fits to it (Laplace's posterior, TFB's anchor set)."""
    data = cfg.data
    split = data.train_split or "train"
    inputs = task_inputs(
        get_task(data.task, data_root=data.data_root),
        split,
        tokenizer,
        data.max_length,
        scoring=data.scoring_spec,
        cache_dir=data.cache_dir,
        device=device,
    )
    return split, inputs


def link_tree(src: Path, dst: Path) -> None:
    """Copy a folder by hard links where the filesystem allows (adapters that target
    ``lm_head`` carry a vocabulary-sized tensor; K copies of it would waste disk)."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)
