"""Baselines through the meta-learning protocol: the same held-out tasks, support sets and
evaluation questions as a meta-trained run, without its meta-learned prior.

* ``zero-shot``: the pretrained model as it is, no adaptation.
* ``lora-support``: the pretrained model with a fresh LoRA adapter (the run's shape, the same
  seeded initialisation for every task) fitted on the task's support set with the budget of
  ABMLL's adaptation (``inner_steps`` SGD steps at ``inner_lr`` on the answer NLL), then scored
  at its weights: the paper's pretrained baseline "updated with 10 gradient steps" (v1, Fig. 1).
* ``blob-support``: a fresh BLoB adapter fitted on the support set alone with the same number
  of steps, on the per-example ELBO, scored by its N-sample predictive (``meta_blob_support``).
* ``multitask-lora``: a LoRA adapter trained on the run's meta-train tasks pooled, with the
  draws and outer budget of ABMLL's meta-training, then fitted on each support set exactly as
  ``lora-support`` is, from those weights instead of a fresh start (``meta_multitask``).

Every fitted baseline takes its budget from the run's saved ABMLL settings
(``adapter/abmll_config.json``), never from a default, so one run's ``meta_eval*.json`` files
compare methods adapted with the same steps and rate.

Each baseline is a :class:`Contender`: an adaptation in the sense of ``meta_evaluate`` (given a
task's support batches, its NLL and a seed, a block within which the model predicts for that
task), the prediction method and its number of weight samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from peft import get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from torch import nn

from blob_lora.methods.base import Method
from blob_lora.methods.lora import LoraMethod
from blob_lora.pipeline.meta_blob_support import SupportBlob
from blob_lora.pipeline.meta_config import MetaConfig
from blob_lora.pipeline.meta_data import MetaRun
from blob_lora.pipeline.meta_multitask import multitask_weights
from blob_lora.tuners.abmll import AbmllConfig
from blob_lora.tuners.abmll.meta import Batch, Nll, expected_nll
from blob_lora.utils.errors import ConfigError

BASELINES = ("zero-shot", "lora-support", "blob-support", "multitask-lora")
#: ``adaptation(support, nll, seed)``: a block within which the model predicts for the task
Adaptation = Callable[[Sequence[Batch], Nll, int], AbstractContextManager[nn.Module]]


@dataclass(frozen=True)
class Contender:
    """One method as the protocol scores it: how it adapts to a task, and how it predicts
    (the method's predictive with ``n_samples`` weight samples; 0 for point estimates)."""

    adaptation: Adaptation
    method: Method
    n_samples: int


def check_baseline(name: str) -> None:
    """``ConfigError`` unless ``name`` is one of :data:`BASELINES`."""
    if name not in BASELINES:
        raise ConfigError(f"--baseline must be one of {', '.join(BASELINES)}, got {name!r}")


def baseline_contender(
    name: str,
    base: nn.Module,
    run: MetaRun,
    *,
    eval_samples: int | None = None,
    progress: bool = False,
) -> Contender:
    """Baseline ``name`` on ``base`` (the pretrained model, which the fitted baselines wrap in
    their adapter) under ``run``'s protocol and budget. ``eval_samples`` is BLoB's N (default
    its own, 10); ``progress`` shows the multi-task training when it runs."""
    check_baseline(name)
    if name == "zero-shot":
        base.eval()

        @contextmanager
        def as_is(support: Sequence[Batch], nll: Nll, seed: int) -> Iterator[nn.Module]:
            yield base

        return Contender(as_is, LoraMethod(), 0)
    if name == "blob-support":
        blob = SupportBlob(base, run.cfg, run.budget, eval_samples)
        return Contender(blob.adapted, blob.method, blob.n_samples)
    lora = SupportLora(base, run.cfg, run.budget)
    if name == "multitask-lora":
        lora.initial = multitask_weights(lora.model, run, progress)
    return Contender(lora.adapted, LoraMethod(), 0)


class SupportLora:
    """One LoRA adapter on the base model, reset to the same initial weights before each
    task and fitted on that task's support set by full-batch SGD. ``initial`` starts as the
    seeded fresh adapter (``lora-support``); ``multitask-lora`` replaces it by its weights."""

    def __init__(self, base: nn.Module, cfg: MetaConfig, budget: AbmllConfig) -> None:
        torch.manual_seed(cfg.seed)  # the initial A, the same for every task
        self.model = get_peft_model(base, cfg.peft_config())
        state = get_peft_model_state_dict(self.model, save_embedding_layers=False)
        self.initial = {k: v.detach().clone() for k, v in state.items()}
        self.steps, self.lr = budget.inner_steps, budget.inner_lr

    @contextmanager
    def adapted(self, support: Sequence[Batch], nll: Nll, seed: int) -> Iterator[nn.Module]:
        """The adapter after ``steps`` SGD steps from ``initial`` on the support set's
        per-example mean NLL. Seeded by the task: LoRA has no weight noise, but a
        ``--lora-dropout`` mask would otherwise depend on the tasks fitted before."""
        set_peft_model_state_dict(self.model, self.initial)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.lr)
        torch.manual_seed(seed)
        self.model.train()
        for _ in range(self.steps):
            optimizer.zero_grad(set_to_none=True)
            expected_nll(self.model, support, nll, 1).backward()
            optimizer.step()
        self.model.eval()
        yield self.model
