"""The settings of an ABMLL adapter (Zhang, Snell, Griffiths 2025, arXiv 2508.14285), kept
apart from PEFT's ``LoraConfig`` in ``abmll_config.json`` so that plain PEFT can still read the
folder (it loads the global *mean* adapter).

Where the defaults come from (``/methods/abmll.py``'s docstring lists each with its source):
the paper's own text we could read (abstracts, v1's Figure 1 caption: 10 gradient steps at test
time), values reviewers of the paper quote (one ``beta = 1e-7`` on both terms in v2, a batch of
2, a point estimate of ``theta``), ABML's published procedure and its public re-implementation
(Ravi & Beatson 2019; the Normal-Gamma hyper-prior, inner lr 1e-2), and our own choices where
all of those are silent, each named as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from blob_lora.utils.options_file import OptionsFile
from blob_lora.utils.settings import check_bool, check_float, check_int

ABMLL_CONFIG_NAME = "abmll_config.json"


@dataclass
class AbmllConfig(
    OptionsFile,
    file_name=ABMLL_CONFIG_NAME,
    missing_hint="is not an ABMLL adapter folder "
    "(its global-mean LoRA loads with peft.PeftModel.from_pretrained)",
):
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
        gamma: weight of the global term ``-log p(theta)`` (v2 of the paper uses one weight
            for both terms, so the default equals ``beta``; v1 had a separate one).
        hyper_prior_std: std of the zero-mean Normal hyper-prior on every entry of the
            prior's mean.
        hyper_shape, hyper_rate: the Gamma hyper-prior on every entry of the prior's
            precision ``1 / sigma^2`` (ABML's ``Gamma(1, 0.01)``).
        inner_steps: SGD steps of the amortised adaptation from ``theta`` on a support set,
            in meta-training and at meta-test alike (0: the task posterior is the prior).
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
    beta: float = 1e-7
    gamma: float = 1e-7
    hyper_prior_std: float = 1.0
    hyper_shape: float = 1.0
    hyper_rate: float = 0.01
    inner_steps: int = 10
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
        for name in ("hyper_prior_std", "hyper_shape", "hyper_rate", "inner_lr"):
            check_float(self, name)
        check_int(self, "inner_steps", allow_zero=True)
        check_int(self, "inner_samples")
        check_int(self, "query_samples")
        check_bool(self, "first_order")
        check_int(self, "eval_samples", allow_zero=True)
