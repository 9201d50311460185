"""The settings of an ABMLL adapter (Zhang, Snell, Griffiths 2025, arXiv 2508.14285), kept
apart from PEFT's ``LoraConfig`` in ``abmll_config.json`` so that plain PEFT can still read the
folder (it loads the global *mean* adapter).

Where the defaults come from: the text of the paper we could read (abstract, two third-party
summaries) names the parameterisation and the two balancing hyperparameters but gives no
values; the inner-loop defaults are those of ABML's public reference code (Ravi & Beatson 2019,
re-implemented by cnguyen10/few_shot_meta_learning: 5 inner SGD steps, inner lr 1e-2 on
mini-ImageNet). Every value is listed with its source in ``methods/abmll.py``'s docstring.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import CheckpointError, ConfigError
from blob_lora.utils.settings import check_bool, check_float, check_int

ABMLL_CONFIG_NAME = "abmll_config.json"


@dataclass
class AbmllConfig:
    """Variational and meta-learning settings of ABMLL, one set for every adapted layer.

    Each adapted weight ``W0`` (``out x in``) gets ``W = W0 + Delta`` with ``Delta`` Gaussian,
    entry by entry: mean ``s B_mu A_mu`` (LoRA's product, ``s`` = alpha / r) and standard
    deviation ``B_sigma A_sigma + c`` (see ``tuners/abmll/layer.py``). The global pairs are the
    prior ``p(phi | theta)``; a task's pairs are its posterior ``q(phi_i)``.

    Attributes:
        std_constant: ``c``, the constant added to the low-rank std product (the paper's
            ``+ cI``). With ``B_sigma`` zero at the start it is every weight's initial std.
            It is also every std's floor: ``|B_sigma A_sigma + c|`` is clamped to at least
            ``c`` (the role ``+ cI`` plays in a covariance: keep the variance away from zero).
            Without the floor the linear form crosses zero wherever ``B_sigma A_sigma = -c``
            and the KL's ``log sigma`` and ``1 / sigma^2`` terms overflow (NaN within five
            inner steps on the tests' tiny model).
            0 is allowed only to check the LoRA limit (the KL is then infinite).
        beta: weight of ``KL(q(phi_i) || p(phi_i | theta))`` against the per-example mean
            NLL, in the adaptation and in the meta-objective ("fidelity of the task-specific
            parameters to the global ones"). Its KL is stiff: in ``B_mu`` its curvature is
            about ``beta * s^2 * |A_mu row|^2 / sigma_prior^2``, so inner SGD diverges once
            ``inner_lr`` times that passes 2 (``beta = 1e-4`` did within three steps on the
            tests' tiny model, where ``s^2 |A|^2`` is about 4 and ``sigma_prior = c``).
        gamma: weight of the global regulariser ``KL(p(. | theta) || N(0, hyper_prior_std^2))``.
        hyper_prior_std: std of that zero-mean hyper-prior on every weight entry.
        inner_steps: SGD steps of the amortised adaptation from ``theta`` on a support set
            (0: the task posterior is the global prior itself).
        inner_lr: their learning rate.
        inner_samples: weight samples averaged per adaptation step.
        query_samples: weight samples averaged for the query NLL of the meta-objective.
        first_order: meta-gradients treat the adaptation's update as a constant (first-order,
            no second derivatives); False differentiates through every inner step.
        eval_samples: default number of weight samples averaged at prediction (0 = means).
    """

    #: errors name a field ``AbmllConfig.<field>`` (``TrainConfig``: its option)
    LABEL: ClassVar[str] = "AbmllConfig"
    #: a run's options and config-file keys would be ``--abmll-<field>`` (``abmll_<field>``)
    KEY_PREFIX: ClassVar[str] = "abmll_"
    #: no run setting of its own: a run's ``--eval-samples`` (unset: this default) is used
    NOT_RUN_SETTINGS: ClassVar[tuple[str, ...]] = ("eval_samples",)

    std_constant: float = 1e-3
    beta: float = 1e-6
    gamma: float = 1e-8
    hyper_prior_std: float = 1.0
    inner_steps: int = 5
    inner_lr: float = 1e-2
    inner_samples: int = 1
    query_samples: int = 1
    first_order: bool = True
    eval_samples: int = 10

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field (or, in a ``TrainConfig``, its option)."""
        for name in ("std_constant", "beta", "gamma"):
            check_float(self, name, allow_zero=True)
        for name in ("hyper_prior_std", "inner_lr"):
            check_float(self, name)
        check_int(self, "inner_steps", allow_zero=True)
        check_int(self, "inner_samples")
        check_int(self, "query_samples")
        check_bool(self, "first_order")
        check_int(self, "eval_samples", allow_zero=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AbmllConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown AbmllConfig fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**data)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        return atomic_write_json(Path(directory) / ABMLL_CONFIG_NAME, self.to_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> AbmllConfig:
        path = Path(directory) / ABMLL_CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(
                f"{path} not found: {directory} is not an ABMLL adapter folder "
                "(its global-mean LoRA loads with peft.PeftModel.from_pretrained)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is unreadable or corrupt: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise CheckpointError(f"{path} holds invalid settings: {exc}") from exc
