"""The settings of a meta-learning run (``blob-lora meta-train``), stored as
``meta_config.json`` in its folder so that ``meta-evaluate`` re-creates the same task split,
support sets and evaluation questions from the run alone.

The method's own settings (ABMLL's ``beta``, inner steps, ...) are not here: they travel with
the adapter in ``adapter/abmll_config.json``, as every tuner's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from blob_lora.tasks.scoring import SCORING_MODES, Scoring
from blob_lora.training.run_dir import META_RUN_CONFIG
from blob_lora.tuners.lora import LoraSettings
from blob_lora.utils.options_file import OptionsFile
from blob_lora.utils.settings import check_choice, check_float, check_int, check_str

META_CONFIG_NAME = META_RUN_CONFIG
#: the methods the protocol meta-trains (the baselines run as ``meta-evaluate --baseline`` of
#: such a run, on its own settings: ``meta_baselines.py``)
META_METHODS = ("abmll",)
#: ``MetaConfig.overlong``: stop on a question that cannot fit, or leave it out
OVERLONG_CHOICES = ("error", "drop")


@dataclass
class MetaConfig(
    LoraSettings,
    OptionsFile,
    file_name=META_CONFIG_NAME,
    missing_hint="is not a meta-learning run folder (written by blob-lora meta-train)",
):
    """One meta-learning run: the task collection and its seeded split, the k-shot protocol,
    the outer loop and the LoRA shape. Errors name the command-line option (``--k-shot``).

    Attributes:
        tasks: the collection (``tasks/collection.py``: ``mmlu``, ``paper``, ``a,b,c`` or a
            folder of task folders).
        data_root: where named tasks are read (else ``$BLOB_LORA_DATA``, else the Hub).
        split: each task's questions the protocol draws from (default: its evaluation split,
            the one every task has).
        meta_test_tasks: tasks held out for meta-evaluation, drawn by ``seed`` (1: the paper
            holds out one task, WinoGrande, as reviewers report).
        k_shot: support questions per task, in meta-training and at meta-test (ours: 5, the
            MMLU few-shot convention; the paper's support size is unknown).
        query_size: query questions per task and meta-training step (ours).
        eval_size: questions scored per meta-test task (``None``: all but the support set).
        meta_steps: outer optimiser steps.
        meta_batch_tasks: tasks per outer step (2: "the low batch size of 2", reviewer-reported;
            whether the paper's 2 counts tasks is unknown).
        lr: AdamW's learning rate on the global parameters (ours).
        batch_size: questions per forward pass (memory only: the losses are per-example means).
        max_length: prompt tokens, as ``--max-length`` of ``train``.
        overlong: what becomes of a question that cannot fit ``max_length`` even with its
            passage and question cut (its options alone are longer): ``error`` (the default:
            the run stops before any training, naming the tasks, the questions and the
            ``--max-length`` that fits them all) or ``drop`` (left out of its task's pool, so
            of every draw and every evaluation; listed in ``tasks.json`` and ``meta_eval*.json``
            as ``overlong``). Why a choice here and not in ``train``: one question of a
            collection's thousands (MMLU: 27 of 14,042 at 256 tokens under cloze scoring)
            should not have to stop a run over all of them.
        scoring: ``letter`` or ``cloze``, as ``--scoring`` of ``train``.
        length_norm: cloze only: ``none``, ``token`` or ``char``, as ``--length-norm`` of
            ``train`` (one setting for every task of the collection).
        seed: the task split, the draws of support / query / evaluation questions, the weight
            samples of adaptation and prediction.

    and, from ``LoraSettings``, ``lora_r``, ``lora_alpha``, ``lora_dropout`` and
    ``target_modules``: the shape shared by all of ABMLL's LoRA pairs (``peft_config()``).
    """

    #: no class label: errors name the option (``--k-shot``), as a user typed it
    LABEL: ClassVar[str] = ""
    KEY_PREFIX: ClassVar[str] = ""

    tasks: str = "mmlu"
    method: str = "abmll"
    model: str = "smollm2-135m"
    dtype: str = "float32"
    data_root: str | None = None
    split: str = "eval"
    meta_test_tasks: int = 1
    k_shot: int = 5
    query_size: int = 8
    eval_size: int | None = None
    meta_steps: int = 100
    meta_batch_tasks: int = 2
    lr: float = 1e-4
    batch_size: int = 8
    max_length: int = 256
    overlong: str = "error"
    scoring: str = "letter"
    length_norm: str = "none"
    seed: int = 0

    @property
    def scoring_spec(self) -> Scoring:
        """How option scores are read, for every task of the run."""
        return Scoring(self.scoring, self.length_norm)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the option of a bad value."""
        super().validate()
        for name in ("tasks", "model", "dtype", "split"):
            check_str(self, name)
        check_str(self, "data_root", optional=True)
        check_choice(self, "method", META_METHODS)
        check_choice(self, "scoring", SCORING_MODES)
        self.scoring_spec  # noqa: B018 (refuses a bad --length-norm, or one under letter)
        check_choice(self, "overlong", OVERLONG_CHOICES)
        for name in ("meta_test_tasks", "query_size", "meta_steps", "meta_batch_tasks"):
            check_int(self, name)
        for name in ("batch_size", "max_length"):
            check_int(self, name)
        check_int(self, "k_shot")
        check_int(self, "eval_size", allow_none=True)
        check_int(self, "seed", allow_zero=True)
        check_float(self, "lr")
