"""The sections of a run's settings that the training floor owns: the loop and its optimiser,
the KL term of the variational methods, and evaluation after training.

Evaluation's settings live here rather than in ``evaluation``: ``TrainConfig`` (this floor)
holds them and methods (below) read the batch size and sample count; ``evaluation`` sits
above and only reads them. Each field keeps its flat name as command-line option and
config-file key (``--lr``, ``--kl-schedule``, ``--eval-samples``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from blob_lora.training.kl_schedule import KL_SCHEDULES
from blob_lora.training.optim import OPTIMIZER_MODES
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.settings import (
    check_bool,
    check_choice,
    check_float,
    check_fraction,
    check_int,
    check_str,
    check_str_list,
    refuse,
)

MAX_SEED = 2**31 - 1
MAX_EPOCHS = 1e6
LOG_WITH = (None, "tensorboard", "wandb", "mlflow", "all")


@dataclass
class LoopConfig:
    """The training loop: its length, batches, optimiser, seed, checkpoints and logs.

    Defaults follow the paper (method doc, section 6) except where CPU cost rules it out.
    """

    KEY_PREFIX: ClassVar[str] = ""

    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    length_chunks: int = 1
    gradient_checkpointing: bool = False
    lr: float = 1e-4
    optimizer: str = "paper"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    seed: int = 1
    checkpoint_every: int = 0
    log_every: int = 1
    log_with: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a bad value, naming its option: types, then counts, numbers, choices."""
        check_str(self, "optimizer")
        check_str(self, "log_with", optional=True)
        check_bool(self, "gradient_checkpointing")
        for name in ("batch_size", "grad_accum", "length_chunks", "log_every"):
            check_int(self, name)
        check_int(self, "max_steps", allow_none=True)
        check_int(self, "checkpoint_every", allow_zero=True)
        check_int(self, "seed", allow_zero=True)
        if self.seed > MAX_SEED:  # numpy seeds stop at 2**32 - 1 (and each process adds its rank)
            raise refuse(self, "seed", f"must be <= {MAX_SEED}, got {self.seed!r}")
        check_float(self, "lr")
        check_float(self, "epochs", allow_none=True)
        if self.epochs is not None and self.epochs > MAX_EPOCHS:
            raise refuse(self, "epochs", f"must be <= {MAX_EPOCHS:g}, got {self.epochs!r}")
        check_float(self, "weight_decay", allow_zero=True)
        check_fraction(self, "warmup_ratio")
        check_choice(self, "optimizer", OPTIMIZER_MODES)
        if self.log_with not in LOG_WITH:
            raise ConfigError(
                f"--log-with must be tensorboard, wandb, mlflow or all, got {self.log_with!r}"
            )


@dataclass
class VariationalConfig:
    """The KL term and its optimiser, read by the methods with a KL (``Method.has_kl``: blob,
    bayesian-lora); the others ignore them. ``--recipe`` (``training.recipes``) sets several
    of them together."""

    KEY_PREFIX: ClassVar[str] = ""

    kl_schedule: str = "geometric"
    kl_rescale: bool = True
    kl_gamma: float = 8.0
    kl_lr: float = 0.01
    std_lr: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a bad value, naming its option."""
        check_str(self, "kl_schedule")
        check_bool(self, "kl_rescale")
        for name in ("kl_lr", "kl_gamma"):
            check_float(self, name)
        check_float(self, "std_lr", allow_none=True)
        check_choice(self, "kl_schedule", KL_SCHEDULES)


@dataclass
class EvalConfig:
    """Evaluation after training (own task, extra tasks) and the held-out learning curve."""

    KEY_PREFIX: ClassVar[str] = ""

    evaluate: bool = True
    eval_split: str | None = None
    eval_tasks: list[str] = field(default_factory=list)
    eval_batch_size: int = 8
    #: weight samples N; ``None``: the method's own default (``Method.samples_by_default``,
    #: for blob and bayesian-lora their options class's ``eval_samples``)
    eval_samples: int | None = None
    curve_every: int = 0
    curve_split: str | None = None
    curve_samples: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a bad value, naming its option."""
        for name in ("eval_split", "curve_split"):
            check_str(self, name, optional=True)
        check_bool(self, "evaluate")
        check_str_list(self, "eval_tasks")
        check_int(self, "eval_batch_size")
        check_int(self, "eval_samples", allow_none=True, allow_zero=True)
        check_int(self, "curve_every", allow_zero=True)
        check_int(self, "curve_samples", allow_none=True, allow_zero=True)
        if self.curve_every and not self.curve_split:
            raise ConfigError(
                "--curve-every needs --curve-split: a held-out part of the training data, "
                "e.g. --train-split 'train[500:]' --curve-split 'train[:500]'"
            )
