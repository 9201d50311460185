"""Cheaper ways to compute the Bayesian predictive, each a measured option (``bench/predictive.py``).

The predictive of a sampling method is the average of ``N`` per-sample softmaxes. Modes:

* ``fold``: all ``N`` samples in one forward, the sample index folded into the batch (the
  method's own ``predict_samples``; the reference every other mode is compared with).
* ``prefix``: when only the top of the network is random (BLoB with ``bayesian_layers``, e.g.
  ``last_blocks_pattern``: the last blocks and the head), the deterministic blocks below the
  first random one run once per batch; their output is repeated ``N`` times and only the
  remaining blocks, the norm and the head run on the folded batch. With the same seed it draws
  the same noise in the same order as ``fold`` and so gives the same probabilities.
* ``early``: samples are drawn in small groups; an example stops as soon as the Monte-Carlo
  standard errors (jackknife) of its predictive's top-class probability and entropy are both
  within ``tol``. Never more than ``N`` samples; identical samples stop after the first group.
* ``prefix-early``: both.
* ``mean``: one deterministic pass with the mean weights (N = 0), the cheap end.

The suffix is run through the model's *own* forward (``blob_lora.models.prefix``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blob_lora.methods import Method
from blob_lora.metrics import entropy
from blob_lora.models.forward import answer_logits, repeat_batch
from blob_lora.models.prefix import (
    PrefixPlan,
    block_index,
    block_lists,
    capture_prefix,
    injected_prefix,
    select_and_repeat,
)
from blob_lora.utils.caller import outside_stacklevel
from blob_lora.utils.errors import ConfigError

MODES = ("fold", "prefix", "early", "prefix-early", "mean")
HEAD_NAMES = ("lm_head", "score")  # modules that may follow the blocks and still be random


@dataclass(frozen=True)
class EarlyStop:
    """When to stop drawing samples for an example (modes ``early`` and ``prefix-early``).

    Attributes:
        tol: stop once the jackknife standard errors of the top-class probability and of the
            predictive entropy (nats) are both at most ``tol``.
        min_samples: size of the first group (at least 2: one sample has no spread).
        group_size: samples drawn per later group.
    """

    tol: float = 0.01
    min_samples: int = 3
    group_size: int = 2

    def validate(self) -> None:
        if not (isinstance(self.tol, int | float) and math.isfinite(self.tol) and self.tol >= 0):
            raise ConfigError(f"early-stopping tol must be a finite number >= 0, got {self.tol!r}")
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int):
            raise ConfigError(
                f"early-stopping min_samples must be an int, got {self.min_samples!r}"
            )
        if self.min_samples < 2:
            raise ConfigError(f"early-stopping min_samples must be >= 2, got {self.min_samples}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise ConfigError(f"early-stopping group_size must be an int, got {self.group_size!r}")
        if self.group_size < 1:
            raise ConfigError(f"early-stopping group_size must be >= 1, got {self.group_size}")


@dataclass
class BatchPredictive:
    """The predictive of one batch.

    ``probs`` (B, C) is the averaged predictive, ``n_used`` (B,) the samples behind each row
    (0 = mean weights). ``total`` is the entropy of ``probs``; ``aleatoric`` (mean entropy of
    the samples) and ``epistemic`` (mutual information) need at least two samples and are
    ``None`` otherwise. ``sample_probs`` (S, B, C) is kept when every row used S >= 1 samples.
    """

    probs: Tensor
    n_used: Tensor
    total: Tensor
    aleatoric: Tensor | None
    epistemic: Tensor | None
    sample_probs: Tensor | None


# ---------------------------------------------------------------------------------------------
# where the deterministic prefix ends (the method says which modules are random)


def plan_prefix(method: Method, model: nn.Module) -> tuple[PrefixPlan | None, str]:
    """Where the deterministic prefix ends, or ``(None, reason)`` when it cannot be reused."""
    names = method.stochastic_modules(model)
    if names is None:
        return None, f"method {method.name!r} does not say which layers are random"
    if not names:
        return None, "no layer is random"
    lists = block_lists(model)
    if len(lists) != 1:
        return None, f"expected one list of transformer blocks, found {sorted(lists) or 'none'}"
    list_name, layers = next(iter(lists.items()))
    first = len(layers)
    for name in names:
        index = block_index(name, list_name)
        if index is not None:
            first = min(first, index)
        elif name.rsplit(".", 1)[-1] not in HEAD_NAMES:
            return None, f"random module {name!r} is neither inside a block nor the output head"
    if first == 0:
        return None, "the first block is already random: there is no deterministic prefix"
    return PrefixPlan(layers, first), ""


# ---------------------------------------------------------------------------------------------
# drawing samples


def _subset(batch: dict[str, Tensor], rows: Tensor | None) -> dict[str, Tensor]:
    if rows is None:
        return batch
    return {k: v.index_select(0, rows.to(v.device)) for k, v in batch.items()}


Draw = Callable[[Tensor | None, int], Tensor]
"""``draw(rows, m)`` -> (m, len(rows), C) option probabilities of ``m`` fresh samples."""


def fold_draw(
    method: Method,
    model: nn.Module,
    batch: dict[str, Tensor],
    option_ids: Tensor | None,
    fold: int | None,
) -> Draw:
    """Each ``draw`` is one call of the method's own ``predict_samples``."""

    def draw(rows: Tensor | None, m: int) -> Tensor:
        return method.predict_samples(model, _subset(batch, rows), option_ids, m, fold=fold)

    return draw


def prefix_draw(
    method: Method,
    model: nn.Module,
    plan: PrefixPlan,
    batch: dict[str, Tensor],
    option_ids: Tensor | None,
    n_samples: int,
    fold: int | None,
) -> Draw:
    """Run the prefix once now; each ``draw`` runs only the random suffix on folded copies."""
    cached = capture_prefix(model, plan, batch)

    def draw(rows: Tensor | None, m: int) -> Tensor:
        sub = _subset(batch, rows)
        chunk = max(1, min(fold or m, m))
        out, done = [], 0
        with method.sampling_mode(model, n_samples):
            while done < m:
                k = min(chunk, m - done)
                with injected_prefix(plan, select_and_repeat(cached, rows, k)):
                    logits = answer_logits(model, repeat_batch(sub, k), option_ids)
                out.append(torch.softmax(logits, -1).view(k, -1, logits.shape[-1]))
                done += k
        return torch.cat(out)

    return draw


# ---------------------------------------------------------------------------------------------
# early stopping


def mc_standard_errors(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Jackknife standard errors of the predictive's top-class probability and entropy.

    ``samples`` is (n, B, C) with n >= 2. For the top-class probability (a mean) this is the
    usual ``std / sqrt(n)``; for the entropy of the mean it is the leave-one-out jackknife.
    Identical samples give exactly 0.
    """
    n = samples.shape[0]
    if n < 2:
        raise ValueError("standard errors need at least two samples")
    s = samples.to(torch.float64)
    mean = s.mean(0)
    top = mean.argmax(-1)
    x = s.gather(-1, top.view(1, -1, 1).expand(n, -1, 1)).squeeze(-1)
    se_top = x.std(0, unbiased=True) / math.sqrt(n)
    loo = ((n * mean - s) / (n - 1)).clamp_min(0.0)
    h = entropy(loo)
    se_h = torch.sqrt((n - 1) / n * (h - h.mean(0)).square().sum(0))
    return se_top, se_h


def early_stopped_samples(
    draw: Draw, batch_size: int, n_max: int, n_classes: int, rule: EarlyStop
) -> tuple[Tensor, Tensor]:
    """(buffer (n_max, B, C), n_used (B,)): draw in groups until each row's estimate settles.

    Rows still drawing always hold the same number of samples, so each group is one call of
    ``draw`` on the rows left; ``buffer[:n_used[b], b]`` are row ``b``'s samples.
    """
    rule.validate()
    buf = torch.zeros(n_max, batch_size, n_classes, dtype=torch.float64)
    n_used = torch.zeros(batch_size, dtype=torch.long)
    active = torch.arange(batch_size)
    n = 0
    while active.numel() and n < n_max:
        m = min(rule.min_samples if n == 0 else rule.group_size, n_max - n)
        rows = None if active.numel() == batch_size else active
        probs = draw(rows, m).detach().to("cpu", torch.float64)
        buf[n : n + m, active] = probs
        n += m
        n_used[active] = n
        if n >= n_max or n < 2:
            continue
        se_top, se_h = mc_standard_errors(buf[:n, active])
        active = active[(se_top > rule.tol) | (se_h > rule.tol)]
    return buf, n_used


def ragged_decomposition(buf: Tensor, n_used: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, total, aleatoric, epistemic) when row ``b`` holds ``n_used[b]`` samples of ``buf``.

    Same conventions as ``metrics.decompose_uncertainty`` (epistemic clamped at 0, total raised
    to aleatoric), computed over each row's own samples.
    """
    n = n_used.to(torch.float64).clamp_min(1)
    mask = (torch.arange(buf.shape[0]).unsqueeze(1) < n_used.unsqueeze(0)).to(torch.float64)
    mean = (buf * mask.unsqueeze(-1)).sum(0) / n.unsqueeze(-1)
    total = entropy(mean)
    aleatoric = (entropy(buf) * mask).sum(0) / n
    epistemic = (total - aleatoric).clamp_min(0.0)
    return mean, torch.maximum(total, aleatoric), aleatoric, epistemic


# ---------------------------------------------------------------------------------------------
# one batch


@dataclass
class ResolvedMode:
    """The mode actually run (after fallbacks) and what it needs."""

    mode: str
    n_samples: int
    plan: PrefixPlan | None = None
    note: str = ""


def resolve_mode(method: Method, model: nn.Module, mode: str, n_samples: int) -> ResolvedMode:
    """Check ``mode`` against the method and model; fall back (with a warning) where it cannot run.

    ``prefix`` needs a method that names its random layers and a deterministic prefix;
    ``early`` needs independent draws per call (not an ensemble's fixed members) and N >= 2.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown predictive mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "mean" or (mode == "fold" and n_samples == 0):
        return ResolvedMode("mean", 0)  # N = 0 is the mean weights: fold asks nothing else
    if n_samples == 0:  # prefix or early reuse / stop over samples there are none of
        note = "N = 0: one pass with the mean weights"
        warnings.warn(
            f"predictive mode {mode!r} runs as 'mean': {note}", stacklevel=outside_stacklevel()
        )
        return ResolvedMode("mean", 0, note=note)
    wants_prefix = mode in ("prefix", "prefix-early")
    wants_early = mode in ("early", "prefix-early")
    notes = []
    plan = None
    if wants_prefix:
        plan, reason = plan_prefix(method, model)
        if plan is None:
            notes.append(f"no prefix reuse ({reason})")
    if wants_early and (n_samples < 2 or not method.iid_samples):
        why = (
            "N < 2"
            if n_samples < 2
            else f"method {method.name!r}'s samples are not independent draws of one "
            "distribution (fixed members, or members taken in turn)"
        )
        notes.append(f"no early stopping ({why})")
        wants_early = False
    name = {(True, True): "prefix-early", (True, False): "prefix", (False, True): "early"}.get(
        (plan is not None, wants_early), "fold"
    )
    note = "; ".join(notes)
    if note:
        warnings.warn(
            f"predictive mode {mode!r} runs as {name!r}: {note}", stacklevel=outside_stacklevel()
        )
    return ResolvedMode(name, n_samples, plan, note)


@torch.no_grad()
def predict_batch(
    method: Method,
    model: nn.Module,
    batch: dict[str, Tensor],
    option_ids: Tensor | None,
    resolved: ResolvedMode,
    fold: int | None = None,
    early: EarlyStop | None = None,
) -> BatchPredictive:
    """The predictive of ``batch`` under ``resolved`` (see :func:`resolve_mode`)."""
    model.eval()
    n = resolved.n_samples
    if resolved.mode == "mean":
        probs = method.predict_samples(model, batch, option_ids, 0, fold=fold)
        # one mean-weights pass; a method whose "N = 0" means all of a fixed set (an
        # ensemble's members) returns several rows, which are then ordinary samples
        return _from_samples(probs.to("cpu", torch.float64), mean_weights=probs.shape[0] == 1)
    if resolved.plan is not None:
        draw = prefix_draw(method, model, resolved.plan, batch, option_ids, n, fold)
    else:
        draw = fold_draw(method, model, batch, option_ids, fold)
    if resolved.mode in ("early", "prefix-early"):
        rule = early or EarlyStop()
        c = int(batch["option_mask"].shape[-1])
        buf, n_used = early_stopped_samples(draw, batch["input_ids"].shape[0], n, c, rule)
        mean, total, aleatoric, epistemic = ragged_decomposition(buf, n_used)
        same = bool((n_used == n_used[0]).all())
        return BatchPredictive(
            mean, n_used, total, aleatoric, epistemic, buf[: int(n_used[0])] if same else None
        )
    return _from_samples(draw(None, n).to("cpu", torch.float64))


def _from_samples(sample_probs: Tensor, mean_weights: bool = False) -> BatchPredictive:
    s, b, _ = sample_probs.shape
    n_used = torch.full((b,), 0 if mean_weights else s, dtype=torch.long)
    if s >= 2:
        mean, total, aleatoric, epistemic = ragged_decomposition(
            sample_probs, torch.full((b,), s, dtype=torch.long)
        )
        return BatchPredictive(mean, n_used, total, aleatoric, epistemic, sample_probs)
    mean = sample_probs[0]
    return BatchPredictive(mean, n_used, entropy(mean), None, None, sample_probs)
