"""``blob-support``: BLoB fitted on a held-out task's support set alone, scored through the
meta-learning protocol. It asks what a Bayesian adapter gains on k examples *without* a
meta-learned prior: ABMLL's posterior starts at the prior learned from other tasks, this one
at BLoB's own prior and initialisation.

Per task (``SupportBlob.adapted``):

* The adapter: the project's BLoB tuner (``get_blob_model``) in the run's LoRA shape
  (``MetaConfig.peft_config()``) with ``BlobConfig``'s defaults (prior std 0.2, initial std
  scale 0.05, token-wise Flipout in training), initialised once under the run's seed and
  reset to those weights (mean, ``B`` and std) before every task, as ``lora-support`` is.
* The objective: the ELBO per support example, ``NLL + pi * KL(q(A) || p(A))``, NLL the
  per-example mean over the support set (one weight sample per step: BLoB's layers sample in
  training) and ``pi = 1 / n`` with ``n`` the support size: the project's ``elbo`` KL schedule
  (``training.kl_schedule.KLSchedule``). Not the paper's geometric schedule with dataset
  rescaling, the training default: its cycle for ``n = 5`` is ``K = int(100 n^(pi/8) / n) = 37``
  steps, so the weights of a 10-step fit (``2^(j-38)``) would leave the KL out entirely and the
  std would never be pulled to the prior; 1/n is the exact per-example bound of the data at hand.
* The optimiser: the one BLoB trains with, the paper's (``training.optim.build_updater``, mode
  ``paper``): AdamW on the NLL for the mean and ``B``, then SGD on ``pi * KL`` for every tensor
  and on NLL + KL for the std. The budget is the run's, shared by every adaptation of the
  comparison: ``inner_steps`` steps, every rate (AdamW's and the SGD's ``kl_lr``) the run's
  ``inner_lr``, held constant as in ABMLL's inner SGD and ``lora-support`` (the paper's 6 %
  warmup over 10 steps would take the first step at rate 0, its decay halve the mean rate).
  Full batch: every step sees the whole support set, as the other adaptations do.
* Prediction: BLoB's N-sample predictive (``methods.blob.BlobMethod``; N = meta-evaluate's
  ``--eval-samples``, else ``BlobConfig.eval_samples`` = 10; N = 0 the mean weights). The fit's
  weight noise is seeded by the task, the predictive's by ``meta_evaluate`` with the same seed
  as ABMLL's, so results are deterministic given the run's seed and independent of task order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from torch import nn

from blob_lora.methods.blob import BlobMethod
from blob_lora.pipeline.meta_config import MetaConfig
from blob_lora.training.kl_schedule import KLSchedule
from blob_lora.training.optim import build_updater
from blob_lora.tuners.abmll import AbmllConfig
from blob_lora.tuners.abmll.meta import Batch, Nll, expected_nll
from blob_lora.tuners.blob import BlobConfig, get_blob_model, kl_divergence


def constant_rate(_factor: Callable[[int], float]) -> Callable[[int], float]:
    """``build_updater``'s ``reshape``: the budget's rate at every step (module doc)."""
    return lambda _step: 1.0


class SupportBlob:
    """One BLoB adapter on the base model, reset before each task and fitted on its support
    set (module doc). ``method`` / ``n_samples``: how the fitted adapter predicts."""

    def __init__(
        self, base: nn.Module, cfg: MetaConfig, budget: AbmllConfig, eval_samples: int | None
    ) -> None:
        blob = BlobConfig() if eval_samples is None else BlobConfig(eval_samples=eval_samples)
        torch.manual_seed(cfg.seed)  # the initial A and std, the same for every task
        self.model = get_blob_model(base, cfg.peft_config(), blob)
        state = get_peft_model_state_dict(self.model, save_embedding_layers=False)
        self.initial = {k: v.detach().clone() for k, v in state.items()}
        self.steps, self.lr = budget.inner_steps, budget.inner_lr
        self.method = BlobMethod()
        self.n_samples = self.method.eval_samples(self.model, eval_samples)

    @contextmanager
    def adapted(self, support: Sequence[Batch], nll: Nll, seed: int) -> Iterator[nn.Module]:
        """The adapter after ``steps`` ELBO steps from the initial weights on ``support``."""
        set_peft_model_state_dict(self.model, self.initial)
        self.model.zero_grad(set_to_none=True)
        n = sum(len(b["labels"]) for b in support)
        schedule = KLSchedule(kind="elbo", cycle=1, n_train=n)  # pi = 1 / n
        updater = build_updater(
            self.model,
            mode="paper",
            bayesian=True,
            lr=self.lr,
            kl_lr=self.lr,
            total_steps=max(1, self.steps),
            warmup_ratio=0.0,
            reshape=constant_rate,
        )
        torch.manual_seed(seed)  # the training weight samples (Flipout)
        self.model.train()
        for step in range(1, self.steps + 1):
            expected_nll(self.model, support, nll, 1).backward()
            updater.step(lambda: kl_divergence(self.model), schedule.weight(step))
        self.model.eval()
        yield self.model
