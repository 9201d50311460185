"""SWAG-LoRA (Onal, Flöge, Caldwell, Sheverdin, Fortuin, AABI 2024): SWA-Gaussian over the LoRA
weights only.

Training: plain LoRA (AdamW, the run's warm-up and linear decay, which is computed over all
steps and so has reached about half of ``--lr`` at the default start) for the first
``--swag-start`` fraction of the optimiser steps; then the learning rate is held at
``--swag-lr`` and, every ``--swag-every`` steps (0: once per epoch, the paper's collection
frequency), the LoRA weights are collected into the running moments of ``methods.swag.posterior`` (first and second moment,
the last ``--swag-rank`` deviations). The collected moments are part of every checkpoint, so a
resumed run collects exactly what an uninterrupted one does.

After the last step the LoRA weights are set to the SWA mean: ``RUN/adapter/`` is a plain PEFT
adapter holding the mean (PEFT alone loads the SWA model) with the moments beside it in
``swag_posterior.safetensors``.

Prediction: N weight vectors drawn from ``N(mean, scale (diag(var) + D^T D / (K - 1)))``, each
written into the LoRA weights for one forward of the batch (so every option of a cloze
question, and every row of the batch, sees the same weights), the weights restored
afterwards; N = 0 is the SWA mean. A draw per forward, not folded into the batch: a weight sample is a
whole adapter, which PEFT's layers cannot vary along the batch.

Defaults, and where they come from (the paper's public code, ``fortuinlab/swag-lora``; the
paper's text could not be consulted here):

* ``--swag-rank`` 5 (``swag_max_num_models: 5``) and collection once per epoch
  (``swag_c_epochs: 1``);
* N = 15 samples at evaluation (``NUM_SAMPLES=15`` of their evaluation scripts);
* ``--swag-lr`` = ``--lr`` / 10 (their training script's ``SWAG_DIV_FACTOR=10``), held constant:
  their code anneals to it (``SWALR``, ``swag_anneal_epochs: 5``, linear); we switch at the
  start of collection, as SWA's constant schedule does;
* ``--swag-scale`` 0.5: SWAG's ``Sigma = 1/2 (Sigma_diag + Sigma_low-rank)`` (Maddox et al.),
  which their config recommends with the low-rank part on; their evaluation scripts ran 1.0;
* ``--swag-start`` 0.5 of the steps is our choice: their runs start at a fixed epoch chosen per
  task (e.g. 8, with collection stopped 5 epochs later), which has no analogue in a run given
  by ``--max-steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from blob_lora.methods.base import RunSettings, StepSchedule, unwrapped
from blob_lora.methods.io import load_plain_adapter
from blob_lora.methods.lora import LoraMethod
from blob_lora.methods.swag.binding import Binding
from blob_lora.methods.swag.posterior import POSTERIOR_FILE, SwagPosterior
from blob_lora.models.forward import answer_logits
from blob_lora.utils.errors import CheckpointError, ConfigError

#: the model attribute that holds the posterior of each adapter, by adapter name
POSTERIORS = "swag_posteriors"
#: ``--swag-lr`` when unset: the run's ``--lr`` divided by this (the authors' training script)
LR_DIVISOR = 10.0
#: key prefix of the moments inside a training checkpoint
STATE_PREFIX = "swag."


@dataclass(frozen=True)
class Collection:
    """When the iterates are collected: after optimiser steps ``start + every``,
    ``start + 2 every``, ... up to ``total`` (1-based step counts)."""

    start: int
    every: int
    total: int

    def collects_at(self, step: int) -> bool:
        return step > self.start and (step - self.start) % self.every == 0

    @property
    def count(self) -> int:
        return (self.total - self.start) // self.every


def collection(cfg: RunSettings, schedule: StepSchedule) -> Collection:
    """The collection steps of a run, refused (``ConfigError``) when fewer than two iterates
    would be collected: one iterate has no spread, and the posterior would be a point."""
    start = int(math.floor(cfg.swag.start * schedule.total_steps))
    every = cfg.swag.every or schedule.steps_per_epoch
    plan = Collection(start, every, schedule.total_steps)
    if plan.count < 2:
        what = f"every {every} steps" if cfg.swag.every else f"once per epoch ({every} steps)"
        raise ConfigError(
            f"SWAG would collect {plan.count} iterate(s): collection starts after step {start} "
            f"of {schedule.total_steps} (--swag-start {cfg.swag.start}) and runs {what}; it "
            "needs at least 2 (set a smaller --swag-every or --swag-start, or train longer)"
        )
    return plan


def moments_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every SWAG posterior's moments on ``model``, named ``<adapter>.<moment>`` (SWAG and
    MultiSWAG's ``Method.posterior_tensors``)."""
    found = getattr(unwrapped(model), POSTERIORS, None) or {}
    return {
        f"{adapter}.{key}": value
        for adapter, posterior in sorted(found.items())
        for key, value in posterior.state_tensors().items()
    }


def swag_lr(cfg: RunSettings) -> float:
    """The constant learning rate while iterates are collected."""
    return cfg.swag.lr if cfg.swag.lr is not None else cfg.loop.lr / LR_DIVISOR


def posteriors(model: nn.Module) -> dict[str, SwagPosterior]:
    """The SWAG posteriors a model carries, by adapter name (``RuntimeError`` if none)."""
    found = getattr(unwrapped(model), POSTERIORS, None)
    if not found:
        raise RuntimeError("not a SWAG model (build it with SwagMethod or load it with its load)")
    return found


def attach_posterior(model: nn.Module, adapter: str, posterior: SwagPosterior) -> None:
    """Give a loaded ``model`` the saved posterior of ``adapter``, checked to fit its tensors
    and that those tensors hold the posterior's mean (a saved SWAG adapter does)."""
    peft = unwrapped(model)
    binding = Binding.for_layout(peft, posterior.layout, adapter)
    if posterior.count:
        stored = binding.flat()
        mean = torch.cat(
            [
                posterior.mean[a:b].to(p.dtype).to(torch.float64).cpu()
                for p, a, b in _slices(binding)
            ]
        )
        if not torch.equal(stored.cpu(), mean):
            raise CheckpointError(
                f"adapter {adapter!r} does not hold the SWA mean of its SWAG posterior "
                "(the adapter and swag_posterior.safetensors come from different runs?)"
            )
    table = getattr(peft, POSTERIORS, None) or {}
    table[adapter] = posterior
    setattr(peft, POSTERIORS, table)


def _slices(binding: Binding) -> list[tuple[nn.Parameter, int, int]]:
    out, start = [], 0
    for p in binding.params:
        out.append((p, start, start + p.numel()))
        start += p.numel()
    return out


@torch.no_grad()
def sample_predictive(
    model: nn.Module,
    adapter: str,
    batch: dict[str, torch.Tensor],
    option_ids: torch.Tensor | None,
    n_samples: int,
) -> torch.Tensor:
    """(max(1, N), B, C) option probabilities of ``adapter``'s posterior: N draws, each one
    forward of the whole batch with the drawn LoRA weights; N = 0 is the weights as they are
    (a trained or loaded model's SWA mean).

    The adapter's weights are restored exactly afterwards, whatever happens: during training
    (``--curve-every``) they are the current iterate, not the mean. Before the first
    collection the posterior is empty and every "draw" is the current weights.
    """
    model.eval()

    def forward() -> torch.Tensor:
        return torch.softmax(answer_logits(model, batch, option_ids), -1)

    posterior = posteriors(model)[adapter]
    if n_samples == 0 or posterior.count == 0:
        return forward().unsqueeze(0).expand(max(1, n_samples), -1, -1).clone()
    binding = Binding.for_layout(unwrapped(model), posterior.layout, adapter)
    current = binding.flat()
    probs = []
    try:
        for _ in range(n_samples):
            binding.assign(posterior.sample())
            probs.append(forward())
    finally:
        binding.assign(current)
    return torch.stack(probs)


class SwagMethod(LoraMethod):
    """SWAG-LoRA: a Gaussian fitted to the LoRA iterates of the end of training (module doc)."""

    name = "swag"
    reads_sections = frozenset({"swag"})
    samples_by_default = 15
    fsdp_refusal = "the SWA mean of its iterates cannot be written back into FSDP's shards"
    mean_column = True  # N = 0: the SWA mean, SWAG-LoRA's own deterministic model
    # every call draws fresh, independent weight vectors
    iid_samples = True

    def build(self, base: nn.Module, cfg: RunSettings) -> PeftModel:
        model = super().build(base, cfg)
        binding = Binding.trainable(model)
        posterior = SwagPosterior(binding.layout, cfg.swag.rank, cfg.swag.scale)
        setattr(model, POSTERIORS, {"default": posterior})
        return model

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        model = load_plain_adapter(base, adapter_dir)
        device = next(model.parameters()).device
        posterior = SwagPosterior.load(Path(adapter_dir) / POSTERIOR_FILE, device)
        attach_posterior(model, "default", posterior)
        return model

    def owns(self, model: nn.Module) -> bool:
        inner = unwrapped(model)
        return bool(getattr(inner, POSTERIORS, None)) and not getattr(
            inner, "ensemble_adapters", None
        )

    # --- along the training iterates --------------------------------------------------------

    def lr_factor(
        self, cfg: RunSettings, schedule: StepSchedule, factor: Callable[[int], float]
    ) -> Callable[[int], float]:
        plan = collection(cfg, schedule)
        ratio = swag_lr(cfg) / cfg.loop.lr

        def swag_factor(step: int) -> float:  # 0-based: update step + 1 uses factor(step)
            return factor(step) if step < plan.start else ratio

        return swag_factor

    def after_step(
        self, model: nn.Module, cfg: RunSettings, step: int, schedule: StepSchedule
    ) -> None:
        binding = Binding.trainable(model)
        if step == 1 and any(hasattr(p, "full_tensor") for p in binding.params):
            # the moments would gather, but the SWA mean cannot be written back into shards
            raise ConfigError(
                "--method swag is not supported under FSDP; train it with DDP "
                "(accelerate launch --multi_gpu) or on one process"
            )
        if collection(cfg, schedule).collects_at(step):
            posteriors(model)["default"].collect(binding.flat())

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = posteriors(model)["default"].state_tensors()
        return {STATE_PREFIX + k: v for k, v in state.items()}

    def load_training_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        mine = {k[len(STATE_PREFIX) :]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
        if not mine or len(mine) != len(state):
            raise CheckpointError(
                "the checkpoint holds no SWAG moments (written by another method?); resuming "
                "without them would lose the collected iterates"
            )
        posteriors(model)["default"].load_state_tensors(mine)

    def finish_training(self, model: nn.Module) -> None:
        posterior = posteriors(model)["default"]
        if posterior.count == 0:
            raise RuntimeError("SWAG collected no iterate (the schedule check should refuse this)")
        binding = Binding.trainable(model)
        posterior.to(binding.params[0].device)  # samples are drawn where a loaded model's are
        binding.assign(posterior.mean)

    def training_summary(
        self, model: nn.Module, cfg: RunSettings, schedule: StepSchedule
    ) -> dict[str, object]:
        plan = collection(cfg, schedule)
        posterior = posteriors(model)["default"]
        return {
            "swag": {
                "collected": posterior.count,
                "first_step": plan.start + plan.every,
                "every": plan.every,
                "lr": swag_lr(cfg),
                "rank": posterior.rank,
                "deviations": int(posterior.deviations.shape[0]),
                "scale": posterior.scale,
                "max_std": float(posterior.variance().sqrt().max()),
            }
        }

    def posterior_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return moments_of(model)

    def save_extras(self, model: nn.Module, adapter_dir: Path) -> None:
        posteriors(model)["default"].save(Path(adapter_dir) / POSTERIOR_FILE)

    # --- prediction -------------------------------------------------------------------------

    @torch.no_grad()
    def predict_samples(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        option_ids: torch.Tensor | None,
        n_samples: int,
        fold: int | None = None,
    ) -> torch.Tensor:
        """(max(1, N), B, C): one forward per weight draw (``fold`` does not apply)."""
        return sample_predictive(model, "default", batch, option_ids, n_samples)
