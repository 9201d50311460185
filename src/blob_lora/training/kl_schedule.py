"""KL weight schedules pi_i for ``loss = NLL_mean + pi_i * KL`` (method doc, section 3).

* ``geometric`` (the authors'): within each cycle of K steps the weight grows as 2^j, summing to
  1 over the cycle, so the KL counts once per cycle but mostly at its end. With dataset rescaling
  (the paper's setting) ``K = int(100 * n^(pi/gamma) / (world_size * batch_size))``; without it
  K is the number of optimiser steps per epoch.
* ``uniform``: pi = 1/K every step (same total weight per cycle, spread evenly).
* ``elbo``: pi = 1/n, the exact per-example evidence lower bound of a mean-NLL loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from blob_lora.utils.errors import ConfigError

KL_SCHEDULES = ("geometric", "uniform", "elbo")


def rescaled_cycle_length(n_train: int, global_batch: int, gamma: float = 8.0) -> int:
    """The authors' "dataset rescaling" cycle: grows sub-linearly with the dataset size."""
    try:
        return max(1, int(100 * n_train ** (math.pi / gamma) / global_batch))
    except OverflowError:  # a tiny --kl-gamma: n^(pi/gamma) exceeds every float
        raise ConfigError(
            f"--kl-gamma {gamma!r} is too small: the KL cycle length overflows "
            f"(100 * {n_train}^(pi/gamma) / {global_batch}); the paper uses 8"
        ) from None


@dataclass(frozen=True)
class KLSchedule:
    kind: str
    cycle: int
    n_train: int

    def __post_init__(self) -> None:
        if self.kind not in KL_SCHEDULES:
            raise ConfigError(f"kl_schedule must be one of {KL_SCHEDULES}, got {self.kind!r}")
        if self.cycle < 1:
            raise ConfigError(f"KL cycle length must be >= 1, got {self.cycle}")
        if self.n_train < 1:
            raise ConfigError(f"training set size must be >= 1, got {self.n_train}")

    def weight(self, step: int) -> float:
        """pi at the 1-based optimiser step ``step``."""
        if step < 1:
            raise ValueError(f"steps are counted from 1, got {step}")
        if self.kind == "elbo":
            return 1.0 / self.n_train
        if self.kind == "uniform":
            return 1.0 / self.cycle
        k = self.cycle
        j = step % k or k
        # 2^j / (2^(K+1) - 1) without overflow for large K.
        return 2.0 ** (j - k - 1) / (1.0 - 2.0 ** -(k + 1))


def make_schedule(
    kind: str,
    n_train: int,
    steps_per_epoch: int,
    global_batch: int,
    rescale: bool = True,
    gamma: float = 8.0,
) -> KLSchedule:
    cycle = rescaled_cycle_length(n_train, global_batch, gamma) if rescale else steps_per_epoch
    return KLSchedule(kind=kind, cycle=max(1, cycle), n_train=n_train)
