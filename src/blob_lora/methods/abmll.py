"""ABMLL (Zhang, Snell, Griffiths 2025, "Amortized Bayesian Meta-Learning for Low-Rank
Adaptation of Large Language Models", arXiv 2508.14285): global LoRA parameters meta-learned as
a prior over task-specific LoRA parameters, whose posterior is inferred by an amortised
procedure from a task's support set.

The model (``tuners/abmll``; equations in ``layer.py`` and ``meta.py``). Each adapted weight
gets a Gaussian update whose mean is a LoRA pair and whose standard deviation is another LoRA
pair plus a constant, ``mu = B_mu A_mu``, ``sigma = B_sigma A_sigma + c``; the global pairs
``theta`` define the prior ``p(phi_i | theta)``, a task's pairs its posterior ``q(phi_i)`` (four
LoRA pairs per layer, as the paper describes). ``q(phi_i)`` is found by ``K`` SGD steps on the
support set's ``NLL + beta KL(q || p_theta)`` started at ``theta`` (ABML's amortisation), and
``theta`` is trained on the query sets' ``NLL + beta KL`` averaged over a batch of tasks plus
``gamma KL(p_theta || hyper-prior)``. At meta-test a new task is adapted the same way and the
predictive averages ``N`` weight samples of ``q(phi_i)`` (one per sequence, folded into the
batch as the other methods do); ``N = 0`` uses the task posterior's means.

What we could read, and what it settles. The paper's full text (arXiv HTML v1-v3, ACL
Anthology UncertaiNLP 2025, OpenReview) was not reachable; we read its abstracts (v1: "a set of
new hyperparameters to balance reconstruction accuracy and the fidelity of task-specific
parameters to the global ones"; v2/v3: "a new hyperparameter"), a third-party review
(themoonlight.io) giving the parameterisation ``mu_theta = B A``, ``sigma_theta = B A + cI``,
``mu_phi``, ``sigma_phi`` likewise, ``c`` a hyperparameter, ``q_theta(phi_i | D_i)`` shared
across tasks so the cost does not grow with their number, and a third-party summary
(emergentmind.com) saying the bound's likelihood and KL terms are rescaled by one weight for
task fidelity and one for global regularisation because of their scale mismatch in LLMs. No
public code of ABMLL was found. ABML's procedure (inner SGD from the global parameters, the
KL to ``p(phi | theta)``, a hyper-prior on ``theta``) is the published ABML one; its defaults
are from the public ABML re-implementation cnguyen10/few_shot_meta_learning (read only).

Choices where those sources are silent (each can be revisited when the paper is readable):

* ``sigma`` is the entrywise *standard deviation* of the update (mean-field over the
  ``out x in`` entries), not a covariance: ``B_sigma A_sigma`` has the weight's shape, and a
  covariance of the update would be ``(out in) x (out in)``. The paper's ``cI`` is read as
  ``c`` added to every entry (``I`` the identity of the entrywise product): with the diagonal
  only, every off-diagonal std would start at 0 (``B_sigma = 0``) and the KL be infinite. Only
  ``sigma^2`` enters, so its sign is irrelevant; a std crossing 0 is held off by the KL's
  ``-log sigma`` term, not by a clamp.
* The mean is LoRA's scaled product ``(alpha / r) B A``, so the layer with ``sigma = 0`` is
  plain LoRA exactly (tested), and the global mean pair is PEFT's ``lora_A`` / ``lora_B``.
* ``beta`` multiplies ``KL(q(phi_i) || p(phi_i | theta))`` against the *per-example mean*
  NLL, in the adaptation and in the meta-objective alike (the untempered bound is
  ``beta = 1 / |D_i|``); ``gamma`` multiplies ``KL(N(mu_theta, sigma_theta^2) || N(0,
  hyper_prior_std^2))``, our reading of "global regularisation" (ABML's hyper-prior, made a
  Gaussian KL since ``theta`` here is a Gaussian's parameters).
* Every std is floored at ``c`` (``max(|B_sigma A_sigma + c|, c)``): the linear form crosses
  zero and the KL then overflows (NaN within five inner steps on a tiny model); ``+ cI`` in a
  covariance plays exactly that role, keeping the variance away from zero.
* Defaults (``AbmllConfig``): ``c = 1e-3`` (BLoB's initial std scale: per-entry noise of
  ``c sqrt(d_in)`` relative to the input, a few per cent of ``W0 x`` at SmolLM2's width),
  ``beta = 1e-6`` (the largest power of ten whose inner SGD did not diverge on the tests'
  tiny model with ``c = 1e-3``, lr 1e-2: the KL's curvature grows as ``beta / c^2``),
  ``gamma = 1e-8``, hyper-prior std 1 (ours: the summed KLs over ``out x in`` entries are
  orders of magnitude above a per-example NLL, the mismatch the paper names; both weights
  are meant to be tuned on held-out meta-train tasks); 5 inner SGD
  steps at lr 1e-2 (ABML's mini-ImageNet settings); one weight sample per inner step and per
  query (ABML used 10 and 10: one keeps an LLM step at one forward); N = 10 at prediction
  (the harness's BLoB default).
* First-order meta-gradients by default (``first_order``): the abstract's case against
  MAML-style LLM meta-learning is its second-order updates; ``first_order=False``
  differentiates through the inner steps.
* Adaptation uses the support set only, in meta-training as at meta-test (ABML's original
  also folds the query set into the posterior during meta-training; not done here).
* The query and support sets are batches of the harness's own tasks, scored by the same
  answer logits as every method (:func:`answer_nll`).

Relation to BLoB (tested in ``tests/tuners/abmll``): with one task and ``theta`` held fixed,
the adaptation minimises ``E_q[NLL] + beta KL(q || p_theta)`` over ``q`` by gradient steps with
reparameterised samples: BLoB's objective (NLL plus a weighted KL to a Gaussian prior, Bayes by
backprop), with ``beta`` for BLoB's KL weight, the prior centred on ``theta`` instead of zero and
the variational family ABMLL's (both factors' product Gaussian entrywise) instead of BLoB's
(Gaussian ``A`` only).

This module is the method strategy (build, load, prediction hooks) plus the NLL the tuner's
adaptation and meta-objective take; it is not in the registry yet: a run of ``blob-lora train``
fits one task, which is not ABMLL. The multi-task protocol and ``meta-train`` /
``meta-evaluate`` (issue 24) will register it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from blob_lora.methods.base import RunSettings, unwrapped
from blob_lora.methods.lora import LoraMethod
from blob_lora.models.forward import answer_logits
from blob_lora.tuners.abmll import (
    AbmllConfig,
    abmll_layers,
    get_abmll_model,
    load_abmll_model,
    sampling,
)
from blob_lora.tuners.abmll.meta import Nll


def answer_nll(option_ids: torch.Tensor | None) -> Nll:
    """The per-example mean NLL of a harness batch (letter or cloze scoring), the likelihood
    of ABMLL's adaptation and meta-objective."""

    def nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = answer_logits(model, batch, option_ids)
        return F.cross_entropy(logits, batch["labels"].to(logits.device))

    return nll


def abmll_configs_of(model: nn.Module) -> dict[str, AbmllConfig]:
    """The settings an ABMLL model carries per adapter (``{}`` for any other model)."""
    return getattr(model, "abmll_configs", None) or getattr(unwrapped(model), "abmll_configs", {})


class AbmllMethod(LoraMethod):
    """The prediction side of ABMLL: a model whose layers sample from the installed task
    posterior (``tuners.abmll.task_posterior``) or, with none, from the global prior."""

    name = "abmll"
    samples_by_default = AbmllConfig.eval_samples
    mean_column = True
    iid_samples = True

    def __init__(self, config: AbmllConfig | None = None) -> None:
        self.config = config or AbmllConfig()

    def build(self, base: nn.Module, cfg: RunSettings) -> PeftModel:
        config = self.config
        if cfg.evaluation.eval_samples is not None:
            config = replace(config, eval_samples=cfg.evaluation.eval_samples)
        return get_abmll_model(base, self.lora_config(cfg), config)

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        return load_abmll_model(base, adapter_dir)

    def owns(self, model: nn.Module) -> bool:
        return bool(abmll_configs_of(model))

    def eval_samples(self, model: nn.Module, requested: int | None) -> int:
        if requested is not None:
            return requested
        configs = abmll_configs_of(model)
        return configs["default"].eval_samples if configs else self.samples_by_default

    @contextmanager
    def sampling_mode(self, model: nn.Module, n_samples: int) -> Iterator[None]:
        # one coherent weight sample per sequence: folded sample copies stay independent
        with sampling(model, n_samples > 0, mode="independent"):
            yield

    @contextmanager
    def mean_mode(self, model: nn.Module) -> Iterator[None]:
        with sampling(model, False):
            yield

    def stochastic_modules(self, model: nn.Module) -> list[str]:
        return [name for name, _ in abmll_layers(model)]
