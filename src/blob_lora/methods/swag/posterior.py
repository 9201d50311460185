"""The SWAG posterior of a flat parameter vector: running moments, deviations, samples, file.

SWA-Gaussian (Maddox et al., 2019) fits a Gaussian to the iterates ``theta_1 .. theta_n`` that
SGD visits after convergence:

* ``mean = (1/n) sum theta_i`` and ``sq_mean = (1/n) sum theta_i^2``, updated in place at each
  collection (``mean_n = mean_{n-1} + (theta_n - mean_{n-1}) / n``, the same for the squares);
* the diagonal variance ``var = max(sq_mean - mean^2, 0)``;
* the deviation matrix ``D`` (rank x P): the last ``rank`` deviations ``theta_i - mean_i`` from
  the running mean at the time each was collected, oldest first.

The posterior is ``N(mean, scale * (diag(var) + D^T D / (k - 1)))`` with ``k`` the number of
rows of ``D`` (``k - 1``: the unbiased sample covariance; SWAG's ``K`` once ``k`` has reached
it), and SWAG's ``scale = 1/2``. A sample is
``mean + sqrt(scale) * (sqrt(var) * z1 + D^T z2 / sqrt(k - 1))`` with ``z1 ~ N(0, I_P)`` and
``z2 ~ N(0, I_k)``: no P x P matrix is ever formed.

Why float64 moments: LoRA weights move little once collection starts, so ``sq_mean - mean^2``
subtracts two nearly equal numbers; in float32 the variance of a weight of size 1e-2 that moves
by 1e-5 would be rounding noise (float32's spacing at 1e-4 is 7e-12, the variance 1e-10). The
deviations themselves are differences, kept in float32.

File: ``swag_posterior.safetensors`` holds ``mean``, ``sq_mean``, ``deviations`` and ``count``;
its metadata holds the parameter names and shapes (the flat vector's layout), ``rank`` and
``scale``, so a predictive is restored from the file and the adapter alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from blob_lora.utils.atomic import atomic_write_bytes
from blob_lora.utils.errors import CheckpointError, DamagedFileError

POSTERIOR_FILE = "swag_posterior.safetensors"
#: SWAG's covariance scale: ``Sigma = 1/2 (Sigma_diag + Sigma_low-rank)`` (Maddox et al., 2019)
DEFAULT_SCALE = 0.5


@dataclass(frozen=True)
class Layout:
    """Which tensors the flat vector holds, in order: their names (adapter-independent keys,
    see ``methods.swag.binding``) and shapes."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


class SwagPosterior:
    """Running SWAG moments of a flat vector of ``layout.numel`` entries (see module doc)."""

    def __init__(
        self, layout: Layout, rank: int, scale: float = DEFAULT_SCALE, device: str = "cpu"
    ) -> None:
        if rank < 2:
            raise ValueError(f"SWAG needs a deviation rank of at least 2, got {rank}")
        if not scale > 0:
            raise ValueError(f"the covariance scale must be > 0, got {scale}")
        p = layout.numel
        self.layout, self.rank, self.scale = layout, rank, float(scale)
        self.mean = torch.zeros(p, dtype=torch.float64, device=device)
        self.sq_mean = torch.zeros(p, dtype=torch.float64, device=device)
        self.deviations = torch.zeros(0, p, dtype=torch.float32, device=device)
        self.count = 0
        # (sqrt(var), D / sqrt(k - 1)) in float64, computed once per state for sampling
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- collection -------------------------------------------------------------------------

    @torch.no_grad()
    def collect(self, theta: torch.Tensor) -> None:
        """Add one iterate (a flat vector in ``layout`` order) to the moments."""
        if theta.shape != self.mean.shape:
            raise ValueError(f"iterate has shape {tuple(theta.shape)}, expected {self.mean.shape}")
        x = theta.detach().to(self.mean.device, torch.float64)
        n = self.count + 1
        self.mean += (x - self.mean) / n
        self.sq_mean += (x * x - self.sq_mean) / n
        dev = (x - self.mean).to(torch.float32).unsqueeze(0)
        self.deviations = torch.cat([self.deviations, dev])[-self.rank :]
        self.count = n
        self._factors = None

    def to(self, device: str | torch.device) -> SwagPosterior:
        """Move the moments to ``device`` (where the adapter is: samples are drawn there)."""
        self.mean, self.sq_mean = self.mean.to(device), self.sq_mean.to(device)
        self.deviations = self.deviations.to(device)
        self._factors = None
        return self

    # --- the Gaussian -----------------------------------------------------------------------

    def variance(self) -> torch.Tensor:
        """The diagonal variance ``max(sq_mean - mean^2, 0)`` (float64)."""
        return (self.sq_mean - self.mean * self.mean).clamp_min(0.0)

    def _low_rank_divisor(self) -> float:
        return math.sqrt(max(1, self.deviations.shape[0] - 1))

    def covariance(self) -> torch.Tensor:
        """The dense P x P covariance ``scale * (diag(var) + D^T D / (k - 1))`` (float64; for
        tests and small P only)."""
        d = self.deviations.to(torch.float64) / self._low_rank_divisor()
        return self.scale * (torch.diag(self.variance()) + d.T @ d)

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw from the posterior (float64), from ``generator`` or the global RNG of the
        moments' device."""
        if self.count == 0:
            raise RuntimeError("the SWAG posterior has collected no iterate yet")
        if self._factors is None:
            d = self.deviations.to(torch.float64) / self._low_rank_divisor()
            self._factors = (self.variance().sqrt(), d)
        std, d = self._factors
        dev = self.mean.device
        z1 = torch.randn(self.mean.shape, generator=generator, dtype=torch.float64, device=dev)
        z2 = torch.randn(d.shape[0], generator=generator, dtype=torch.float64, device=dev)
        return self.mean + math.sqrt(self.scale) * (std * z1 + d.T @ z2)

    # --- state and file ---------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The moments as tensors (CPU copies): what a checkpoint and the file hold."""
        return {
            "mean": self.mean.detach().cpu().clone(),
            "sq_mean": self.sq_mean.detach().cpu().clone(),
            "deviations": self.deviations.detach().cpu().clone(),
            "count": torch.tensor([self.count], dtype=torch.int64),
        }

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors`, checked against this posterior's layout and rank."""
        need = {"mean", "sq_mean", "deviations", "count"}
        if set(state) != need:
            raise CheckpointError(f"SWAG state holds {sorted(state)}, expected {sorted(need)}")
        p = self.layout.numel
        dev = state["deviations"]
        if state["mean"].shape != (p,) or state["sq_mean"].shape != (p,):
            raise CheckpointError(
                f"SWAG moments have {tuple(state['mean'].shape)} entries, this adapter {p}"
            )
        if dev.ndim != 2 or dev.shape[1] != p or dev.shape[0] > self.rank:
            raise CheckpointError(
                f"SWAG deviations have shape {tuple(dev.shape)}, expected (<= {self.rank}, {p})"
            )
        count = int(state["count"].reshape(-1)[0])
        if count < dev.shape[0]:
            raise CheckpointError(f"SWAG count {count} is below its {dev.shape[0]} deviations")
        device = self.mean.device
        self.mean = state["mean"].to(device, torch.float64).clone()
        self.sq_mean = state["sq_mean"].to(device, torch.float64).clone()
        self.deviations = dev.to(device, torch.float32).clone()
        self.count = count
        self._factors = None

    def save(self, path: Path) -> Path:
        """Write the posterior to ``path`` atomically (safetensors, layout in the metadata)."""
        meta = {
            "names": json.dumps(list(self.layout.names)),
            "shapes": json.dumps([list(s) for s in self.layout.shapes]),
            "rank": str(self.rank),
            "scale": repr(self.scale),
        }
        tensors = {k: v.contiguous() for k, v in self.state_tensors().items()}
        return atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> SwagPosterior:
        """The posterior saved by :meth:`save` (``CheckpointError`` naming the file if it is
        missing or damaged)."""
        path = Path(path)
        try:
            data = path.read_bytes()
            tensors = load(data)
            meta = _metadata(data)
            layout = Layout(
                tuple(json.loads(meta["names"])),
                tuple(tuple(int(d) for d in s) for s in json.loads(meta["shapes"])),
            )
            rank, scale = int(meta["rank"]), float(meta["scale"])
        except FileNotFoundError as exc:
            raise DamagedFileError(f"{path} is missing: the run holds no SWAG posterior") from exc
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as exc:
            raise DamagedFileError(f"SWAG posterior {path} is unreadable: {exc}") from exc
        if len(layout.names) != len(layout.shapes):
            raise CheckpointError(f"SWAG posterior {path}: names and shapes differ in number")
        try:
            post = cls(layout, rank, scale, device=str(device))
        except ValueError as exc:
            raise CheckpointError(f"SWAG posterior {path}: {exc}") from exc
        post.load_state_tensors(tensors)
        return post


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta


def layout_of(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> Layout:
    """The layout of ``tensors`` under ``names``."""
    return Layout(tuple(names), tuple(tuple(t.shape) for t in tensors))
