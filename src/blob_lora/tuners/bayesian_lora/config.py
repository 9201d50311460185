"""The settings of a Bayesian-LoRA adapter (Lin et al. 2026), kept apart from PEFT's
``LoraConfig`` in ``bayesian_lora_config.json`` so that plain PEFT can still read the folder and
load the posterior-mean adapter.

The defaults are the authors' released configuration (``configs/inducing/inducing8.yaml`` of
their code, and the KL weight and sample count of its ``train_script.py``); the paper's full text
was not available to us, see ``methods/bayesian_lora.py`` for what that leaves open.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from blob_lora.utils.options_file import OptionsFile
from blob_lora.utils.settings import check_bool, check_float, check_int, check_str, refuse

BAYESIAN_LORA_CONFIG_NAME = "bayesian_lora_config.json"
#: the authors' Bayesian layers (``key_layers: [q_proj, k_proj, lm_head]`` of their
#: ``inducing8.yaml``): LoRA targets named otherwise stay plain LoRA (their v_proj)
AUTHORS_LAYERS = r"(.*\.)?(q_proj|k_proj|lm_head)"
#: every LoRA target Bayesian: what a folder saved before ``layers`` existed holds
EVERY_LAYER = ".*"


@dataclass
class BayesianLoraConfig(
    OptionsFile,
    file_name=BAYESIAN_LORA_CONFIG_NAME,
    missing_hint="is not a Bayesian-LoRA adapter folder "
    "(its posterior-mean LoRA loads with peft.PeftModel.from_pretrained)",
):
    """Variational settings of Bayesian-LoRA, one set for every LoRA factor (``A`` and ``B``).

    Each factor ``W`` (``d_out x d_in``) gets an inducing matrix ``U`` (``inducing_rows x
    inducing_cols``); see ``tuners/bayesian_lora/inducing.py`` for the model.

    Attributes:
        inducing_rows, inducing_cols: the size of ``U`` (authors: 9 x 9).
        prior_std: scale of the prior on every element of ``W``; with ``sqrt_width_scaling``
            it is divided by ``sqrt(d_in)`` (authors: 0.1, scaled).
        sqrt_width_scaling: divide ``prior_std`` by the square root of the factor's input size.
        init_lamda: initial ``lambda``, the factor scaling the conditional covariance of
            ``q(W | U)`` relative to ``p(W | U)`` (authors: 1e-3; "lamda" as in their code).
        max_lamda: ``lambda`` is clamped to at most this (authors: 0.03).
        init_u_std: initial std of the whitened ``q(U)`` (authors: 1e-3).
        max_u_std: the std of ``q(U)`` is clamped to at most this (authors: 0.1).
        init_d: initial diagonal ``D_r``, ``D_c`` of the prior covariances of ``U`` (1e-3).
        kl_weight: factor on the KL in the loss, on top of the run's KL schedule (authors:
            0.1, with a per-step weight of 1 / batches per epoch: ``--kl-schedule uniform
            --kl-rescale false``).
        eval_samples: default number of weight samples averaged at prediction (authors' code:
            4; 0 = the posterior-mean weights).
        jitter: relative diagonal jitter of the Cholesky factorisations.
        layers: regular expression, matched whole against a LoRA target's module name in the
            base model (``model.layers.3.self_attn.q_proj``): the targets that match are
            Bayesian, the others plain LoRA layers trained by the same optimiser. The
            authors' code makes only ``q_proj``, ``k_proj`` and ``lm_head`` Bayesian
            (``key_layers``), so with their LoRA targets (q, v, head) the value projection is
            plain LoRA and carries most of the learning; their default here. ``".*"`` makes
            every target Bayesian (a Llama-style ``q_proj`` is not GPT-2's ``c_attn``: a
            model whose targets match nothing is refused, naming this option).
    """

    #: errors name a field ``BayesianLoraConfig.<field>`` (``TrainConfig``: its option)
    LABEL: ClassVar[str] = "BayesianLoraConfig"
    #: a run's options and config-file keys: ``--bayes-lora-<field>`` (``bayes_lora_<field>``)
    KEY_PREFIX: ClassVar[str] = "bayes_lora_"
    #: no run setting of its own: a run's ``--eval-samples`` (unset: this default) is used
    NOT_RUN_SETTINGS: ClassVar[tuple[str, ...]] = ("eval_samples",)

    inducing_rows: int = 9
    inducing_cols: int = 9
    prior_std: float = 0.1
    sqrt_width_scaling: bool = True
    init_lamda: float = 1e-3
    max_lamda: float = 0.03
    init_u_std: float = 1e-3
    max_u_std: float = 0.1
    init_d: float = 1e-3
    kl_weight: float = 0.1
    eval_samples: int = 4
    jitter: float = 1e-6
    layers: str = AUTHORS_LAYERS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field (or, in a ``TrainConfig``, its option)."""
        for name in ("inducing_rows", "inducing_cols"):
            check_int(self, name)
        for name in ("prior_std", "init_lamda", "max_lamda", "init_u_std", "max_u_std", "init_d"):
            check_float(self, name)
        for name in ("kl_weight", "jitter"):
            check_float(self, name, allow_zero=True)
        if self.init_lamda > self.max_lamda:
            raise refuse(
                self,
                "init_lamda",
                f"({self.init_lamda!r}) must not exceed max_lamda ({self.max_lamda!r})",
            )
        if self.init_u_std > self.max_u_std:
            raise refuse(
                self,
                "init_u_std",
                f"({self.init_u_std!r}) must not exceed max_u_std ({self.max_u_std!r})",
            )
        check_bool(self, "sqrt_width_scaling")
        check_int(self, "eval_samples", allow_zero=True)
        check_str(self, "layers")
        try:
            re.compile(self.layers)
        except re.error as exc:
            raise refuse(
                self, "layers", f"({self.layers!r}) is not a regular expression: {exc}"
            ) from exc

    def is_bayesian(self, module_name: str) -> bool:
        """Whether the LoRA target ``module_name`` (its name in the base model) is Bayesian."""
        return re.fullmatch(self.layers, module_name) is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BayesianLoraConfig:
        """The settings of ``data``; a file written before ``layers`` existed made every LoRA
        target Bayesian, and loads so."""
        if "layers" not in data:
            data = {**data, "layers": EVERY_LAYER}
        return super().from_dict(data)
