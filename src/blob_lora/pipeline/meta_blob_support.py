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
  training) and ``pi = 1 / n`` with ``n`` the support size: the weight the project's ``elbo`` KL
  schedule gives (``training.kl_schedule.KLSchedule``). Not the paper's geometric schedule with dataset
  rescaling, the training default: its cycle for ``n = 5`` is ``K = int(100 n^(pi/8) / n) = 37``
  steps, so the weights of a 10-step fit (``2^(j-38)``) would leave the KL out entirely and the
  std would never be pulled to the prior; 1/n is the exact per-example bound of the data at hand.
* The optimiser: plain SGD on that ELBO for every trainable tensor (mean and std of ``A``,
  ``B``), ``inner_steps`` full-batch steps at the run's ``inner_lr``: the budget and the
  optimiser of every adaptation of the comparison (ABMLL's inner SGD, ``lora-support``), so
  that the contenders differ only in their objective and starting point. Not BLoB's training
  optimiser (AdamW on the mean and ``B``): Adam's normalised steps at the same rate move each
  weight by about ``inner_lr`` per step whatever its gradient, 0.1 over 10 steps at 1e-2,
  far more than SGD moves ``lora-support``'s, so "the same budget" would not mean the same
  distance from the start.
* Prediction: BLoB's N-sample predictive (``methods.blob.BlobMethod``; N = meta-evaluate's
  ``--eval-samples``, else ``BlobConfig.eval_samples`` = 10; N = 0 the mean weights). The fit's
  weight noise is seeded by the task, the predictive's by ``meta_evaluate`` with the same seed
  as ABMLL's, so results are deterministic given the run's seed and independent of task order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from torch import nn

from blob_lora.methods.blob import BlobMethod
from blob_lora.pipeline.meta_config import MetaConfig
from blob_lora.tuners.abmll import AbmllConfig
from blob_lora.tuners.abmll.meta import Batch, Nll, expected_nll
from blob_lora.tuners.blob import BlobConfig, get_blob_model, kl_divergence


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
        n = sum(len(b["labels"]) for b in support)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.lr)
        torch.manual_seed(seed)  # the training weight samples (Flipout)
        self.model.train()
        for _ in range(self.steps):
            optimizer.zero_grad(set_to_none=True)
            elbo = expected_nll(self.model, support, nll, 1) + kl_divergence(self.model) / n
            elbo.backward()
            optimizer.step()
        self.model.eval()
        yield self.model
