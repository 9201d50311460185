"""The Bayesian settings of a BLoB adapter, kept apart from PEFT's ``LoraConfig``.

They live in their own file (``blob_config.json``) next to PEFT's ``adapter_config.json`` so that
plain PEFT can still read the folder and load the mean adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from blob_lora.utils.errors import ConfigError
from blob_lora.utils.options_file import OptionsFile
from blob_lora.utils.settings import (
    check_choice,
    check_float,
    check_int,
    check_regexes,
    check_str,
    check_str_list,
    refuse,
)

BLOB_CONFIG_NAME = "blob_config.json"
STD_PARAMS = ("square", "softplus")
FLIPOUT_MODES = ("token", "sequence", "shared")
#: Weight noise of predictive samples: ``sequence`` (one coherent weight sample per sequence,
#: the posterior predictive) or ``token`` (the authors' token-wise Flipout at evaluation).
EVAL_NOISE_MODES = ("sequence", "token")


@dataclass
class BlobConfig(
    OptionsFile,
    file_name=BLOB_CONFIG_NAME,
    missing_hint="is not a BLoB adapter folder "
    "(a plain LoRA adapter can be loaded with peft.PeftModel.from_pretrained)",
):
    """Variational settings of BLoB (method doc, sections 1-2): the one home of these settings
    and their defaults. ``training.TrainConfig`` holds one as ``cfg.blob``, each field a
    command-line option and config-file key of its own name (``--prior-std``, ...), except
    ``eval_samples``: a run's ``--eval-samples`` is the evaluation section's, and this default
    is what BLoB uses when that is unset.

    Attributes:
        prior_std: sigma_p of the isotropic Gaussian prior on every element of A.
        init_std: epsilon of the method doc. With ``std_param="square"`` the free parameter G is
            drawn from U(eps/sqrt(2), eps), so the initial std G**2 lies in [eps**2/2, eps**2].
            With ``"softplus"`` rho is initialised so that softplus(rho) covers the same range,
            keeping the initial posterior identical across parameterisations.
        std_param: how the free parameter maps to the std: elementwise square or softplus.
        flipout: how noise is decorrelated within a batch: per ``token`` (the authors'),
            per ``sequence`` (one coherent weight sample per sequence) or ``shared`` (one sample
            for the whole batch, folded into the mean matmul).
        eval_samples: default number of weight samples averaged at prediction (0 = mean weights).
        eval_noise: weight noise of those samples: ``sequence`` (default: one coherent sample of
            ``A`` per sequence, the proper posterior predictive) or ``token`` (the authors'
            evaluation: token-wise Flipout, each token of a sequence seeing another sign
            pattern of the same noise magnitude), independent across the N samples either way.
        bayesian_layers: regular expressions searched in module names; only matching LoRA
            layers get a std (the rest stay plain LoRA). ``None`` makes every LoRA layer Bayesian.
    """

    #: errors name a field ``BlobConfig.<field>`` (``TrainConfig`` re-names it by its option)
    LABEL: ClassVar[str] = "BlobConfig"
    KEY_PREFIX: ClassVar[str] = ""
    #: fields that are no run setting of their own (see the class doc)
    NOT_RUN_SETTINGS: ClassVar[tuple[str, ...]] = ("eval_samples",)

    prior_std: float = 0.2
    init_std: float = 0.05
    std_param: str = "square"
    flipout: str = "token"
    eval_samples: int = 10
    eval_noise: str = "sequence"
    bayesian_layers: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field (or, in a ``TrainConfig``, its option)."""
        check_str(self, "std_param")
        if isinstance(self.bayesian_layers, str):
            self.bayesian_layers = [self.bayesian_layers]
        check_str_list(self, "bayesian_layers", optional=True)
        check_int(self, "eval_samples", allow_zero=True)
        for name in ("prior_std", "init_std"):
            check_float(self, name)
        check_choice(self, "std_param", STD_PARAMS)
        check_choice(self, "flipout", FLIPOUT_MODES)
        check_choice(self, "eval_noise", EVAL_NOISE_MODES)
        if self.std_param == "square" and self.init_std >= 1:
            raise refuse(
                self,
                "init_std",
                f"must be in (0, 1) with std_param='square', got {self.init_std!r}",
            )
        check_regexes(self, "bayesian_layers", self.bayesian_layers or ())

    def is_bayesian(self, module_name: str) -> bool:
        """Whether the LoRA layer called ``module_name`` gets a learned std."""
        if self.bayesian_layers is None:
            return True
        return any(re.search(p, module_name) for p in self.bayesian_layers)


def last_blocks_pattern(num_layers: int, k: int, include_head: bool = True) -> list[str]:
    """Patterns for ``bayesian_layers`` that select the last ``k`` transformer blocks (and head).

    Used to make only the top of the network Bayesian, so that prediction can run the
    deterministic prefix once and reuse it for every weight sample.
    """
    if not 0 <= k <= num_layers:
        raise ConfigError(f"k must be in [0, {num_layers}], got {k}")
    patterns = [rf"\blayers\.{i}\." for i in range(num_layers - k, num_layers)]
    if include_head:
        patterns.append(r"\blm_head$")
    return patterns
