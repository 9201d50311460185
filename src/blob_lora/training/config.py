"""All settings of a training run; the CLI's long options map one-to-one onto these fields."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from blob_lora.methods import get_method
from blob_lora.tasks.scoring import Scoring
from blob_lora.training.kl_schedule import KL_SCHEDULES
from blob_lora.training.optim import OPTIMIZER_MODES
from blob_lora.training.recipes import RECIPES
from blob_lora.tuners.blob.config import EVAL_NOISE_MODES, FLIPOUT_MODES, STD_PARAMS
from blob_lora.utils.errors import ConfigError

MAX_SEED = 2**31 - 1
MAX_EPOCHS = 1e6


@dataclass
class TrainConfig:
    """Defaults follow the paper (method doc, section 6) except where CPU cost rules it out."""

    model: str = "smollm2-135m"
    task: str = "winogrande_s"
    method: str = "blob"
    recipe: str = "paper"
    out: str = "runs/run"
    data_root: str | None = None
    train_split: str | None = None
    eval_split: str | None = None
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    eval_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    kl_lr: float = 0.01
    std_lr: float | None = None
    optimizer: str = "paper"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    seed: int = 1
    max_length: int = 300
    scoring: str = "letter"
    length_norm: str = "none"
    eval_samples: int | None = None
    eval_noise: str = "sequence"
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "lm_head"])
    prior_std: float = 0.2
    init_std: float = 0.05
    std_param: str = "square"
    flipout: str = "token"
    bayesian_layers: list[str] | None = None
    kl_schedule: str = "geometric"
    kl_rescale: bool = True
    kl_gamma: float = 8.0
    ensemble_size: int = 3
    swag_start: float = 0.5
    swag_every: int = 0
    swag_rank: int = 5
    swag_lr: float | None = None
    swag_scale: float = 0.5
    checkpoint_every: int = 0
    log_every: int = 1
    log_with: str | None = None
    dtype: str = "float32"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    trust_remote_code: bool = False
    bucket_by_length: bool = False
    evaluate: bool = True
    eval_tasks: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    prefix_cache: bool = True
    curve_every: int = 0
    curve_split: str | None = None
    curve_samples: int | None = None

    def __post_init__(self) -> None:
        self._apply_recipe()
        self.validate()

    def _apply_recipe(self) -> None:
        """Set the recipe's settings wherever the field still holds its default
        (``training.recipes``: an explicit other value wins)."""
        if not isinstance(self.recipe, str) or self.recipe not in RECIPES:
            raise ConfigError(f"--recipe must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) == defaults[name]:
                setattr(self, name, value)

    def validate(self) -> None:
        """Refuse a bad setting with one clear message naming its command-line option.

        Types first: a config file can hold any YAML/TOML/JSON value, and a wrong type must be
        refused here rather than fail deep inside a library later; then ranges, then choices.
        """
        self._check_types()
        self._check_counts()
        self._check_numbers()
        self._check_choices()
        Scoring(self.scoring, self.length_norm)  # refuses a bad --scoring / --length-norm
        get_method(self.method)

    def _check_types(self) -> None:
        """Strings, booleans and lists of strings (lists are stored as lists: resume compares)."""
        for name in (
            "model",
            "task",
            "method",
            "recipe",
            "out",
            "optimizer",
            "kl_schedule",
            "std_param",
        ):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(
                    f"{_flag(name)} must be a non-empty string, got {getattr(self, name)!r}"
                )
        for name in (
            "data_root",
            "train_split",
            "eval_split",
            "cache_dir",
            "log_with",
            "curve_split",
        ):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{_flag(name)} must be a string, got {v!r}")
        for name in (
            "kl_rescale",
            "load_in_8bit",
            "load_in_4bit",
            "trust_remote_code",
            "bucket_by_length",
            "evaluate",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{_flag(name)} must be true or false, got {getattr(self, name)!r}"
                )
        for name in ("target_modules", "eval_tasks", "bayesian_layers"):
            v = getattr(self, name)
            if v is None and name == "bayesian_layers":
                continue
            if not isinstance(v, list | tuple) or not all(
                isinstance(x, str) and x.strip() for x in v
            ):
                raise ConfigError(
                    f"{_flag(name)} must be a list of non-empty strings "
                    f"(comma-separated on the command line), got {v!r}"
                )
            setattr(self, name, list(v))  # as run_config.json stores it (resume compares)

    def _check_counts(self) -> None:
        """Integer settings: sizes, steps, samples, the seed and the curve's split."""
        for name in ("batch_size", "eval_batch_size", "grad_accum", "lora_r"):
            _positive_int(self, name)
        _positive_int(self, "max_steps", allow_none=True)
        _positive_int(self, "eval_samples", allow_none=True, allow_zero=True)
        _positive_int(self, "checkpoint_every", allow_zero=True)
        _positive_int(self, "curve_every", allow_zero=True)
        _positive_int(self, "curve_samples", allow_none=True, allow_zero=True)
        if self.curve_every and not self.curve_split:
            raise ConfigError(
                "--curve-every needs --curve-split: a held-out part of the training data, "
                "e.g. --train-split 'train[500:]' --curve-split 'train[:500]'"
            )
        _positive_int(self, "log_every")
        _positive_int(self, "ensemble_size")
        _positive_int(self, "swag_every", allow_zero=True)
        _positive_int(self, "swag_rank", lo=2)  # one deviation has no low-rank covariance
        _positive_int(self, "seed", allow_zero=True)
        if self.seed > MAX_SEED:  # numpy seeds stop at 2**32 - 1 (and each process adds its rank)
            raise ConfigError(f"--seed must be <= {MAX_SEED}, got {self.seed!r}")
        _positive_int(self, "max_length", lo=16)

    def _check_numbers(self) -> None:
        """Real-valued settings: rates, scales, epochs, decay, warm-up and dropout."""
        for name in ("lr", "kl_lr", "lora_alpha", "prior_std", "init_std", "kl_gamma"):
            _positive_float(self, name)
        _positive_float(self, "std_lr", allow_none=True)
        _positive_float(self, "swag_lr", allow_none=True)
        _positive_float(self, "swag_scale")
        _positive_float(self, "epochs", allow_none=True)
        if self.epochs is not None and self.epochs > MAX_EPOCHS:
            raise ConfigError(f"--epochs must be <= {MAX_EPOCHS:g}, got {self.epochs!r}")
        _positive_float(self, "weight_decay", allow_zero=True)
        for name in ("warmup_ratio", "lora_dropout", "swag_start"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
                raise ConfigError(f"{_flag(name)} must be a number in [0, 1), got {v!r}")

    def _check_choices(self) -> None:
        """Settings with a fixed set of values, and a non-empty --target-modules."""
        choices = {
            "optimizer": OPTIMIZER_MODES,
            "kl_schedule": KL_SCHEDULES,
            "std_param": STD_PARAMS,
            "flipout": FLIPOUT_MODES,
            "eval_noise": EVAL_NOISE_MODES,
            "dtype": ("float32", "bfloat16", "float16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{_flag(name)} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.log_with not in (None, "tensorboard", "wandb", "mlflow", "all"):
            raise ConfigError(
                f"--log-with must be tensorboard, wandb, mlflow or all, got {self.log_with!r}"
            )
        if not self.target_modules:
            raise ConfigError("--target-modules must name at least one module")

    @property
    def scoring_spec(self) -> Scoring:
        """How option scores are read (letter or cloze), for datasets and evaluation."""
        return Scoring(self.scoring, self.length_norm)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def stored_with_defaults(cls, stored: dict[str, Any]) -> dict[str, Any]:
        """A stored ``run_config.json`` completed with the defaults of settings added since it
        was written: such a run ran with that setting's default (what resume and ``compare``
        compare against, so a new option does not orphan every existing run)."""
        defaults = cls().to_dict()
        return {**{k: v for k, v in defaults.items() if k not in stored}, **stored}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    # Settings that may differ between an interrupted run and its resumption.
    RESUMABLE_CHANGES = (
        "out",
        "log_with",
        "evaluate",
        "eval_tasks",
        "eval_batch_size",
        "checkpoint_every",
        # caches change where inputs come from, not what is learned (up to float rounding)
        "cache_dir",
        "prefix_cache",
        # the curve is scored under a forked RNG: it does not change what is learned
        "curve_every",
        "curve_split",
        "curve_samples",
    )


def _flag(name: str) -> str:
    """The command-line option of a setting, as error messages name it."""
    return f"--{name.replace('_', '-')}"


def _positive_int(
    cfg: TrainConfig,
    name: str,
    allow_none: bool = False,
    allow_zero: bool = False,
    lo: int | None = None,
) -> None:
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    lo = lo if lo is not None else 0 if allow_zero else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{_flag(name)} must be an integer >= {lo}, got {v!r}")


def _positive_float(
    cfg: TrainConfig, name: str, allow_none: bool = False, allow_zero: bool = False
) -> None:
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < 0 or (v == 0 and not allow_zero):
        rng = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{_flag(name)} must be a finite number {rng}, got {v!r}")
