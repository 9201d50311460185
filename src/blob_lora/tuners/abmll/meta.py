"""ABMLL's amortised inference of a task posterior and its meta-training objective.

Amortised as in ABML (Ravi & Beatson 2019): the inference network *is* a fixed procedure
started at the global parameters, ``K`` SGD steps on the task's support-set objective, so its
cost does not grow with the number of tasks and the same procedure adapts a new task at
meta-test. With ``lambda`` the four pairs of every layer (``PARTS``)::

    lambda_0 = theta
    lambda_{k+1} = lambda_k - inner_lr * grad F_S(lambda_k)
    F_S(lambda) = E_{q_lambda}[NLL(support)] + beta * KL(q_lambda || p_theta)

and the meta-objective over a batch of tasks ``(S_i, Q_i)`` minimised over ``theta``::

    L(theta) = mean_i [ E_{q_lambda_i}[NLL(Q_i)] + beta * KL(q_lambda_i || p_theta) ]
               + gamma * (-log p(theta))

``theta`` being a point estimate, its KL term is ``-log p(theta)`` under the Normal-Gamma
hyper-prior (``model.hyper_nll``); ``lambda_i = lambda_K`` is adapted on ``S_i``. NLLs are
per-example means and expectations one-sample Monte-Carlo estimates (``inner_samples`` /
``query_samples`` average more). With
``first_order`` the inner update is treated as a constant: ``lambda_i = theta + stop_grad(
lambda_K - theta)``, so the query NLL's gradient at ``lambda_K`` is applied to ``theta`` (as
first-order MAML) and the KL's gradient reaches ``theta`` through both ``q`` and ``p``; without
it the gradient flows through every inner step (second derivatives).

The NLL is a callable ``nll(model, batch) -> mean NLL`` so that this floor stays free of the
task formats (``methods/abmll.py`` supplies the answer-logit NLL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from blob_lora.tuners.abmll.config import AbmllConfig
from blob_lora.tuners.abmll.model import (
    TaskPosterior,
    abmll_layers,
    global_posterior,
    hyper_nll,
    sampling,
    task_kl,
    task_posterior,
)
from blob_lora.utils.errors import ConfigError

Batch = dict[str, torch.Tensor]
#: ``nll(model, batch)``: the mean negative log-likelihood of the batch under the model as it is
Nll = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class Task:
    """One meta-training task: its support batches (adaptation) and query batches (loss);
    ``nll`` replaces :func:`meta_loss`'s own for this task (tasks of a collection score
    different answer tokens)."""

    support: Sequence[Batch]
    query: Sequence[Batch]
    nll: Nll | None = None


def config_of(model: nn.Module) -> AbmllConfig:
    """The settings an ABMLL model carries (the first layer's; every layer shares them)."""
    for _, layer in abmll_layers(model):
        return layer.abmll_config
    raise ConfigError("the model has no ABMLL layer")


def _generator(model: nn.Module, seed: int) -> torch.Generator:
    device = next(p.device for p in model.parameters())
    return torch.Generator(device=device).manual_seed(seed)


def expected_nll(
    model: nn.Module, batches: Sequence[Batch], nll: Nll, samples: int
) -> torch.Tensor:
    """``E_q[NLL]`` per example over ``batches``: ``samples`` draws, batch means weighted by
    their sizes (the layers must be sampling, the posterior installed)."""
    if not batches:
        raise ConfigError("a task needs at least one support and one query batch")
    sizes = [len(next(iter(b.values()))) for b in batches]
    total = sum(sizes)
    out: torch.Tensor | None = None
    for _ in range(samples):
        for batch, size in zip(batches, sizes, strict=True):
            term = nll(model, batch).float() * (size / total)
            out = term if out is None else out + term
    assert out is not None
    return out / samples


def adapt(
    model: nn.Module,
    support: Sequence[Batch],
    nll: Nll,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    create_graph: bool = False,
) -> TaskPosterior:
    """The task posterior ``q(phi | support)``: ``inner_steps`` SGD steps on ``F_S`` from the
    global parameters (module doc). Deterministic given ``seed`` (or ``generator``): the weight
    draws come from it, not from the global RNG.

    ``create_graph`` keeps the result a differentiable function of ``theta`` (second-order
    meta-gradients); otherwise the result is detached and ``theta`` is left untouched.
    """
    cfg = config_of(model)
    if generator is None:
        generator = _generator(model, 0 if seed is None else seed)
    post = global_posterior(model, detach=not create_graph)
    keys = list(post)
    for _ in range(cfg.inner_steps):
        with task_posterior(model, post), sampling(model, True, "shared", generator):
            loss = expected_nll(model, support, nll, cfg.inner_samples)
            if cfg.beta:
                loss = loss + cfg.beta * task_kl(model).to(loss.device)
        grads = torch.autograd.grad(loss, [post[k] for k in keys], create_graph=create_graph)
        step = {k: post[k] - cfg.inner_lr * g for k, g in zip(keys, grads, strict=True)}
        post = (
            step if create_graph else {k: v.detach().requires_grad_(True) for k, v in step.items()}
        )
    if create_graph:
        return post
    return {k: v.detach() for k, v in post.items()}


def meta_loss(
    model: nn.Module, tasks: Sequence[Task], nll: Nll | None = None, *, seed: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L(theta)`` over ``tasks`` (module doc) and its parts; call ``.backward()`` on it and
    step an optimiser over the model's trainable (global) parameters."""
    if not tasks:
        raise ConfigError("meta_loss needs at least one task")
    if nll is None and any(task.nll is None for task in tasks):
        raise ConfigError("meta_loss needs an nll, its own or every task's")
    cfg = config_of(model)
    generator = _generator(model, seed)
    theta = global_posterior(model, detach=False)
    total: torch.Tensor | None = None
    nll_sum = kl_sum = 0.0
    for task in tasks:
        task_nll = task.nll or nll
        post = adapt(
            model, task.support, task_nll, generator=generator, create_graph=not cfg.first_order
        )
        if cfg.first_order:  # theta + stop_grad(lambda_K - theta)
            post = {k: theta[k] + (post[k] - theta[k].detach()).to(theta[k].dtype) for k in post}
        with task_posterior(model, post), sampling(model, True, "shared", generator):
            query_nll = expected_nll(model, task.query, task_nll, cfg.query_samples)
            kl = task_kl(model).to(query_nll.device)
        term = query_nll + cfg.beta * kl if cfg.beta else query_nll  # 0 * inf KL would be NaN
        total = term if total is None else total + term
        nll_sum += float(query_nll.detach())
        kl_sum += float(kl.detach())
    assert total is not None
    loss = total / len(tasks)
    hyper = hyper_nll(model).to(loss.device)
    if cfg.gamma:
        loss = loss + cfg.gamma * hyper
    parts = {
        "query_nll": nll_sum / len(tasks),
        "task_kl": kl_sum / len(tasks),
        "hyper_nll": float(hyper.detach()),
    }
    return loss, parts
