"""All settings of a training run: one section per concern, one flat key per setting.

A run's settings are grouped by who reads them, each group a small dataclass on the floor that
owns the concern and validating its own fields:

* ``cfg.base``: the base model and how it is loaded (``models.config.BaseModelConfig``);
* ``cfg.data``: task, data folder, training split, prompt length, scoring
  (``tasks.config.DataConfig``);
* ``cfg.loop``: steps, batches, optimiser, seed, checkpoints, logs (``training.sections``);
* ``cfg.kl``: the KL term of the methods with one, blob and bayesian-lora
  (``training.sections.VariationalConfig``);
* ``cfg.lora``: LoRA, whose ``peft_config()`` is PEFT's ``LoraConfig`` (``tuners.lora``);
* ``cfg.blob``: ``BlobConfig``, the one home of BLoB's settings and defaults;
* ``cfg.bayes_lora``: ``BayesianLoraConfig`` (options ``--bayes-lora-*``);
* ``cfg.swag``: ``methods.swag.SwagConfig`` (``--swag-*``); ``cfg.ensemble``:
  ``methods.ensemble.EnsembleConfig`` (``--ensemble-size``);
* ``cfg.evaluation``: evaluation after training and the learning curve
  (``training.sections.EvalConfig``);

plus ``method``, ``recipe`` and ``out``. Users see flat keys: the command line's long options,
config-file keys, ``TrainConfig(lr=...)`` and ``run_config.json`` (which resume and ``compare``
read back) all name a setting ``<section's KEY_PREFIX><field>`` (``lr``, ``prior_std``,
``swag_rank``, ``bayes_lora_inducing_rows``). :data:`SETTINGS`, derived from the sections'
fields, routes each flat key to its section, so a new field is a new key with no other edit.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, ClassVar, NamedTuple

from blob_lora.methods import get_method
from blob_lora.methods.ensemble import EnsembleConfig
from blob_lora.methods.swag import SwagConfig
from blob_lora.models.config import BaseModelConfig
from blob_lora.tasks.config import DataConfig
from blob_lora.training.recipes import RECIPES
from blob_lora.training.sections import EvalConfig, LoopConfig, VariationalConfig
from blob_lora.tuners.bayesian_lora.config import EVERY_LAYER, BayesianLoraConfig
from blob_lora.tuners.blob.config import BlobConfig
from blob_lora.tuners.lora import LoraSettings
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.settings import SettingError, check_str, flag

#: the sections, by attribute of ``TrainConfig``, in the order their keys are listed
SECTIONS: dict[str, type] = {
    "base": BaseModelConfig,
    "data": DataConfig,
    "loop": LoopConfig,
    "kl": VariationalConfig,
    "lora": LoraSettings,
    "blob": BlobConfig,
    "bayes_lora": BayesianLoraConfig,
    "swag": SwagConfig,
    "ensemble": EnsembleConfig,
    "evaluation": EvalConfig,
}
#: the sections only some methods read (``Method.reads_sections`` names those a method does)
METHOD_SECTIONS: frozenset[str] = frozenset({"kl", "blob", "bayes_lora", "swag", "ensemble"})
#: the top-level settings and their defaults
TOP_LEVEL: dict[str, str] = {"method": "blob", "recipe": "paper", "out": "runs/run"}


class Setting(NamedTuple):
    """One flat setting: its key, the section holding it (``None``: top level) and its field."""

    key: str
    section: str | None
    name: str
    field: Field[Any] | None

    @property
    def default(self) -> Any:
        """The default value (a fresh copy for lists)."""
        if self.field is None:
            return TOP_LEVEL[self.key]
        if self.field.default is not MISSING:
            return self.field.default
        return self.field.default_factory()  # type: ignore[misc]


def _settings() -> dict[str, Setting]:
    """Every flat key, from the sections' fields: ``KEY_PREFIX + field name``."""
    table = {key: Setting(key, None, key, None) for key in TOP_LEVEL}
    for attr, section in SECTIONS.items():
        skip = getattr(section, "NOT_RUN_SETTINGS", ())
        for f in fields(section):
            if f.name in skip:
                continue
            key = section.KEY_PREFIX + f.name  # type: ignore[attr-defined]
            if key in table:
                raise RuntimeError(f"setting {key!r} is declared twice")  # a coding error
            table[key] = Setting(key, attr, f.name, f)
    return table


#: flat key -> where it lives; what the CLI, config files and ``run_config.json`` name
SETTINGS: dict[str, Setting] = _settings()


@dataclass(init=False)
class TrainConfig:
    """A run's settings by section (``cfg.loop.lr``), built from flat keys
    (``TrainConfig(lr=1e-3)``, :meth:`from_dict`) and stored flat (:meth:`to_dict`)."""

    method: str
    recipe: str
    out: str
    base: BaseModelConfig
    data: DataConfig
    loop: LoopConfig
    kl: VariationalConfig
    lora: LoraSettings
    blob: BlobConfig
    bayes_lora: BayesianLoraConfig
    swag: SwagConfig
    ensemble: EnsembleConfig
    evaluation: EvalConfig

    def __init__(self, **settings: Any) -> None:
        """Flat keys (module doc); the recipe is applied, then every section validates itself.

        Refuses unknown keys, and a bad value with one message naming its option.
        """
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown settings {unknown}; known: {sorted(SETTINGS)}")
        settings = _with_recipe(settings)
        for key in TOP_LEVEL:
            value = settings[key]
            setattr(self, key, TOP_LEVEL[key] if value is _UNSET else value)
            check_str(self, key)
        for attr, section in SECTIONS.items():
            values = {s.name: settings[k] for k, s in SETTINGS.items() if s.section == attr}
            try:
                setattr(self, attr, section(**{n: v for n, v in values.items() if v is not _UNSET}))
            except SettingError as exc:  # name the option, as the user typed it
                key = section.KEY_PREFIX + exc.setting  # type: ignore[attr-defined]
                raise SettingError(flag(key), exc.setting, exc.problem) from None
        if get_method(self.method).meta_learned:
            raise ConfigError(
                f"--method {self.method} learns from a collection of tasks, not from one: "
                f"use 'blob-lora meta-train --tasks COLLECTION --out RUN' (mmlu, paper, a list "
                "of tasks or a folder of task folders), then 'blob-lora meta-evaluate --run RUN'"
            )

    def to_dict(self) -> dict[str, Any]:
        """The flat settings, as ``run_config.json`` stores them (lists copied)."""
        return {key: copy.deepcopy(self.get(key)) for key in SETTINGS}

    def get(self, key: str) -> Any:
        """The value of one flat setting (``cfg.get("lr") == cfg.loop.lr``)."""
        s = SETTINGS[key]
        return getattr(self if s.section is None else getattr(self, s.section), s.name)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some flat settings changed (validated, the recipe applied again).

        A new ``recipe`` first takes back what the old one set: a setting that still holds the
        old recipe's value (and is not among ``changes``) returns to its default, so that the
        new recipe applies as in a fresh config instead of inheriting the old one's values.
        """
        current = self.to_dict()
        new_recipe = changes.get("recipe", current["recipe"])
        if new_recipe != current["recipe"]:
            for key, value in RECIPES.get(current["recipe"], {}).items():
                if key not in changes and current[key] == value:
                    current[key] = SETTINGS[key].default
        return TrainConfig(**{**current, **changes})

    def evaluation_splits(self) -> list[tuple[str, str]]:
        """(task, split) of every evaluation the run makes after training: its own task on
        ``--eval-split`` (else the task's eval split, ``"eval"``), then each ``--eval-tasks``
        entry on its eval split; empty without ``--evaluate``. One list, read both by the
        evaluation and by the check before training that these splits can be scored."""
        if not self.evaluation.evaluate:
            return []
        own = self.data.task
        splits = [(own, self.evaluation.eval_split or "eval")]
        return splits + [(name, "eval") for name in self.evaluation.eval_tasks if name != own]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every flat setting's default."""
        return {key: s.default for key, s in SETTINGS.items()}

    @classmethod
    def stored_with_defaults(cls, stored: dict[str, Any]) -> dict[str, Any]:
        """A stored ``run_config.json`` completed with the defaults of settings added since it
        was written: such a run ran with that setting's default (what resume and ``compare``
        compare against, so a new option does not orphan every existing run), or, for a
        setting whose default is not what runs did before it existed, with
        :attr:`VALUES_BEFORE_THE_SETTING`."""
        defaults = cls().to_dict()
        stored = {key: cls._as_now_read(key, value) for key, value in stored.items()}
        method = stored.get("method")  # any JSON value: the file may have been edited by hand
        for key, (methods, value) in cls.VALUES_BEFORE_THE_SETTING.items():
            if isinstance(method, str) and method in methods:
                defaults[key] = value
        return {**{k: v for k, v in defaults.items() if k not in stored}, **stored}

    @staticmethod
    def _as_now_read(key: str, value: Any) -> Any:
        """A stored value in today's spelling of what it meant then: an empty string of an
        optional setting was read as unset (now refused, so stored as ``None``), and any
        truthy ``prefix_cache`` turned the cache on (now a bool)."""
        setting = SETTINGS.get(key)
        if setting is not None and setting.default is None and value == "":
            return None
        if key == "prefix_cache" and not isinstance(value, bool):
            return bool(value)
        return value

    #: what a run of the methods that read a setting did before it existed, where its default
    #: differs (other methods' runs ignore it and take the default): Bayesian-LoRA made every
    #: LoRA target Bayesian until ``bayes_lora_layers`` (2026-12-04), whose default is the
    #: authors' q_proj / k_proj / lm_head
    VALUES_BEFORE_THE_SETTING: ClassVar[dict[str, tuple[frozenset[str], Any]]] = {
        "bayes_lora_layers": (frozenset({"bayesian-lora"}), EVERY_LAYER)
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The settings of a flat dict (``run_config.json``, a ``compare`` run); keys missing
        take their defaults, unknown keys are refused."""
        return cls(**data)

    # Settings that may differ between an interrupted run and its resumption.
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (
        "out",
        "log_with",
        "evaluate",
        "eval_tasks",
        "eval_batch_size",
        "checkpoint_every",
        # caches change where inputs come from, not what is learned (up to float rounding)
        "cache_dir",
        "prefix_cache",
        # the same gradient from other chunks of the batch (float rounding; its own draws of
        # the weight noise per chunk)
        "length_chunks",
        # the backward recomputes the same forward (weight noise and dropout replayed from the
        # saved RNG state): the same gradients
        "gradient_checkpointing",
        # the curve is scored under a forked RNG: it does not change what is learned
        "curve_every",
        "curve_split",
        "curve_samples",
    )
    # Settings that do not change what a run learns: the resumable ones, where the data is
    # read from, and the logging interval.
    NOT_LEARNED: ClassVar[tuple[str, ...]] = (*RESUMABLE_CHANGES, "data_root", "log_every")
    # Settings of how a trained run is scored after training, not of what it learns: a
    # composite's sub-run may differ in them, and ``compare`` re-scores a finished run that
    # does instead of refusing it. (``evaluate`` and ``eval_tasks`` are resumable changes.)
    EVALUATION_ONLY: ClassVar[tuple[str, ...]] = ("eval_split", "eval_samples", "eval_noise")


def unread_settings(method_name: str, keys: Collection[str]) -> list[str]:
    """Those of ``keys`` (flat settings) that method ``method_name`` does not read, sorted:
    giving them changes nothing in its runs (a section of :data:`METHOD_SECTIONS` that is not
    among ``Method.reads_sections``, or one of ``Method.ignores_settings``)."""
    method = get_method(method_name)

    def read(key: str) -> bool:
        section = SETTINGS[key].section
        return key not in method.ignores_settings and (
            section not in METHOD_SECTIONS or section in method.reads_sections
        )

    return sorted(key for key in keys if key in SETTINGS and not read(key))


def setting_differences(
    previous: dict[str, Any], wanted: dict[str, Any], ignore: Collection[str] = ()
) -> list[str]:
    """The keys, sorted, whose values differ between two flat settings dicts (a missing key
    counts as ``None``), leaving out ``ignore``. Why one function: resuming a run, a table
    checking its finished runs and a composite run looking for a sub-run it may reuse all
    compare stored settings this way, each with its own keys that may differ."""
    return sorted(
        k
        for k in set(previous) | set(wanted)
        if k not in ignore and previous.get(k) != wanted.get(k)
    )


_UNSET = object()


def _with_recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """All flat keys (``_UNSET`` where not given), the recipe's values set wherever a setting
    still holds its default (``training.recipes``: an explicit other value wins)."""
    recipe = settings.get("recipe", TOP_LEVEL["recipe"])
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
    full = {key: settings.get(key, _UNSET) for key in SETTINGS}
    for key, value in RECIPES[recipe].items():
        given = full[key]
        if given is _UNSET or given == SETTINGS[key].default:
            full[key] = value
    return full
