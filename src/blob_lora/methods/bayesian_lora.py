"""Bayesian-LoRA (Lin, Guan, Patane, Gregg, Botterweck 2026, arXiv 2601.21003): LoRA's ``A``
and ``B`` drawn from sparse-GP-style inducing-weight posteriors, trained on the ELBO.

The model (``tuners/bayesian_lora/inducing.py`` has the equations): each LoRA factor ``W``
(``A``: ``r x in``, ``B``: ``out x r``) is generated from a small inducing matrix ``U`` (9 x 9)
whose prior is Kronecker-factored, ``p(vec U) = N(0, K_c (x) K_r)`` with learned
``K = Z Z^T + D^2`` (the "Kronecker-factored SGP posterior" the paper maps LoRA's factorisation
onto), and ``p(W | U) = N(M_W(U), Sigma_W)``, the Gaussian conditional of a matrix-normal joint.
The posterior is ``q(U) q_lambda(W | U)``: a diagonal Gaussian on the whitened ``U`` and the prior
conditional with its covariance scaled by a learned ``lambda^2``. A forward draws ``U``, then
``W`` by Matheron's rule; the loss is ``NLL + pi * kl_weight * KL`` with the closed-form KL
``KL(q(V) || N(0, I)) + d_out d_in (lambda^2 / 2 - log lambda - 1/2)`` summed over factors.
As ``lambda`` and the std of ``q(U)`` go to zero, the factors become the deterministic
posterior means and the layer is exactly plain LoRA with those weights (the paper's limit;
``tests/tuners/bayesian_lora`` checks it). Prediction averages ``N`` weight samples (default 4),
one coherent sample of every factor per sequence; ``N = 0`` uses the posterior means.

Sources and the choices they left open. The paper's full text was not available here (only its
abstract and a third-party summary giving ``U``, ``p(U) = N(0, K_c (x) K_r)``, ``q(U) = N(m, S)``
and ``p(W | U) = N(M_W(U), lambda^2 Sigma_W)`` with a learnable ``lambda``); the algorithm and
its defaults were read from the authors' public code (``anonymouspaper987/Bayesian-LoRA``, read
only, nothing copied), whose inducing layer is Ritter et al.'s (ICML 2021) inducing-weight
layer applied to PEFT's ``lora_A`` and ``lora_B``. Where it and this implementation differ:

* Posterior on ``U``: the code's default (``q_inducing: diagonal``, whitened) is implemented.
  The code's latest layer variant also passes ``U`` through a masked autoregressive flow and
  jitters ``Z`` with learned noise; neither is in the paper's summary, neither is implemented.
* Defaults (``BayesianLoraConfig``): 9 x 9 inducing matrices, prior std 0.1 / sqrt(fan-in),
  ``lambda`` initialised at 1e-3 and clamped to 0.03, ``q(U)`` std initialised at 1e-3 and
  clamped to 0.1, ``D`` initialised at 1e-3 (all the code's); the Cholesky jitter (1e-6 of the
  mean diagonal) is our choice (the code's constant was not in the files we could read).
* The objective: the code minimises ``CE + 0.1 * KL / (batches per epoch)`` with one AdamW over
  every parameter. Here the 0.1 is ``kl_weight`` (applied by :meth:`BayesianLoraMethod.kl`) and
  the per-step weight is the run's KL schedule: ``--kl-schedule uniform --kl-rescale false`` gives
  the code's ``1 / batches per epoch``. Bayesian-LoRA has no std parameters in BLoB's sense,
  so every ``--optimizer`` mode is one AdamW on ``NLL + pi * KL`` (``--kl-lr`` and
  ``--std-lr`` do not apply). Not reproduced: the code's 0.05 label smoothing and 0.05 entropy
  bonus (not part of the ELBO), its KL switched off for the first two epochs, and its
  reporting of the best epoch on the evaluation set.
* Samples: the code draws one weight sample per forward for the whole batch, in training and at
  evaluation (4 forwards averaged). Training does the same here (``shared``); prediction draws
  one sample per sequence (``independent``), so several samples of an example folded into one
  batch are independent, and the options of a cloze question (one packed sequence) share one.
* Which LoRA layers are Bayesian: the code's ``key_layers`` (q_proj, k_proj, lm_head) are,
  its other LoRA targets stay plain LoRA layers trained by the same AdamW: with its targets
  (q, v, head) the value projection is plain (its ``train_script.log`` prints v_proj's
  ``lora_A`` as a plain ``Linear`` beside q_proj's ``InducingLinear``). Here
  ``--bayes-lora-layers`` (a regular expression on the targets' module names) says which;
  its default is the authors' three names, ``'.*'`` makes every target Bayesian (what this
  implementation did before 2026-12-04; a folder or run saved then loads so). A model whose
  targets match none (GPT-2's ``c_attn``) is refused. Quantised (8/4-bit) bases are not
  supported.
* FSDP is refused (the KL and the factorisations read whole parameters); plain data
  parallelism (``accelerate launch --multi_gpu``) is the multi-process path.
* Learning speed: with the authors' prior scale (0.1 / sqrt(fan-in)) the Bayesian factors
  start and stay small: ``A ~ 0.1 / sqrt(in) * M_W``, so moving the output needs inducing
  means several prior stds out, and AdamW moves each parameter by about ``lr`` per step. On
  SmolLM2-135M with every target Bayesian (q/v of the top 8 blocks and the head, the regime
  table's setting, lr 3e-4), 800 steps on OpenBookQA left the held-out training questions'
  NLL where the pretrained model has it, to five digits, where plain LoRA went from 29.7 % to
  53.3 % (``paper/bayes_lora_pilot.yaml``, ``results/bayes_lora_pilot/``). With the
  authors' layout (v_proj plain) it reached 46.7 %, through v_proj: the trained Bayesian
  layers' update ``scaling * B A`` was 500-1,300x smaller than v_proj's, and the predictive's
  epistemic part (N = 4) ~1e-13 nats. On this model, at the authors' scales and clamps, the
  Bayesian layers do not move the output: LoRA on v_proj alone scores as it does (NLL 1.231
  against 1.230), and without the width division (``sqrt_width_scaling=False``) the Bayesian
  layers' update stays at its random initial size. On the tests' tiny 2-block Llama (24 ARC-Easy
  records, 48 steps, lr 2e-2, ``--kl-schedule elbo``, every target Bayesian) the training NLL
  went 1.395 -> 1.391 (LoRA: 1.411 -> 0.513), also with the KL switched off (1.395 ->
  1.381), while ``prior_std=1`` without width scaling and no KL learned like LoRA (1.376 ->
  0.469). The authors train 6 epochs at lr 7.4e-4 (AdamW,
  weight decay 0.027, lr x0.1 after epochs 2 and 4); runs here need their own lr / length.
* "About 0.42M extra parameters" (paper) could not be reconciled exactly with the code's
  layers: each factor carries ``p d_out + q d_in + 2 p q + p + q + 1`` parameters instead of
  LoRA's ``d_out d_in``, so the count depends on the targets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from blob_lora.methods.base import RunSettings, unwrapped
from blob_lora.methods.sampled import SampledLoraMethod
from blob_lora.tuners.bayesian_lora import (
    BayesianLoraConfig,
    bayesian_lora_layers,
    get_bayesian_lora_model,
    kl_divergence,
    load_bayesian_lora_model,
    pinned_factors,
    sampling,
)
from blob_lora.utils.errors import ConfigError


def bayesian_lora_config_from(cfg: RunSettings) -> BayesianLoraConfig:
    """The run's Bayesian-LoRA settings (``cfg.bayes_lora``, the ``--bayes-lora-*`` options),
    with the run's ``--eval-samples`` when given (unset: the class's own default)."""
    if cfg.evaluation.eval_samples is None:
        return replace(cfg.bayes_lora)
    return replace(cfg.bayes_lora, eval_samples=cfg.evaluation.eval_samples)


class BayesianLoraMethod(SampledLoraMethod):
    name = "bayesian-lora"
    has_kl = True
    reads_sections = frozenset({"kl", "bayes_lora"})
    # no std parameters in BLoB's sense: one AdamW on NLL + pi * KL (module doc)
    ignores_settings = frozenset({"kl_lr", "std_lr"})
    samples_by_default = BayesianLoraConfig.eval_samples
    options_attr = "bayesian_lora_configs"
    fsdp_refusal = "its KL and Cholesky factorisations read whole parameters"

    def samples_asked_by(self, cfg: RunSettings) -> int | None:
        return bayesian_lora_config_from(cfg).eval_samples

    def build(self, base: nn.Module, cfg: RunSettings) -> PeftModel:
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ConfigError(_FSDP_REFUSAL)  # before the run folder is written
        return get_bayesian_lora_model(base, self.lora_config(cfg), bayesian_lora_config_from(cfg))

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        return load_bayesian_lora_model(base, adapter_dir)

    def kl(self, model: nn.Module) -> torch.Tensor:
        _refuse_sharded(model)
        configs = self.options_of(model)
        weight = configs["default"].kl_weight if configs else BayesianLoraConfig.kl_weight
        return weight * kl_divergence(unwrapped(model))

    def weight_sampling(
        self, model: nn.Module, enabled: bool, mode: str | None
    ) -> AbstractContextManager[Any]:
        return sampling(model, enabled, mode)

    @contextmanager
    def frozen(self, model: nn.Module) -> Iterator[None]:
        """The prior's factorisations of every factor, computed once for the whole pass
        (``tuners.bayesian_lora.pinned_factors``): the same draws, without factorising each
        layer's 9 x 9 matrices again for every batch."""
        with pinned_factors(unwrapped(model)):
            yield

    def sampling_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        return bayesian_lora_layers(model)


_FSDP_REFUSAL = (
    "--method bayesian-lora is not supported under FSDP (its KL and Cholesky factorisations "
    "read whole parameters); launch it with plain data parallelism (accelerate launch "
    "--multi_gpu) instead"
)


def _refuse_sharded(model: nn.Module) -> None:
    """Refuse FSDP-sharded posteriors with a clear error before the first step."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in unwrapped(model).parameters()):
        raise ConfigError(_FSDP_REFUSAL)
