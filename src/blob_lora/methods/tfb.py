"""TFB, training-free Bayesianisation of a trained LoRA adapter, predicted like BLoB.

Why here: it turns any trained LoRA adapter into a BLoB-style low-rank Gaussian without
further training, so it is the cheapest Bayesian baseline to compare BLoB against.

1. Training: an ordinary ``lora`` run into ``RUN/lora/``.
2. Rotation, per LoRA layer: the SVD ``B = U diag(d) Vᵀ`` gives ``B' = U diag(d)`` and
   ``A' = Vᵀ A``, so ``B' A' = B A`` (the mean model is unchanged).
3. Posterior: ``A'_ij ~ N(A'_ij, (σ / d_i)²)``. Then ``B' ΔA' = U E`` with ``E`` iid ``N(0, σ²)``:
   a low-rank *isotropic* Gaussian on the weight update, one σ for the whole adapter. Rows
   with ``d_i ≈ 0`` (``B'`` column zero) get no noise: it could not reach the output anyway.
4. σ: the largest value whose predictive NLL on an *anchor set* rises by at most
   ``NLL_TOLERANCE`` (0.3 %, relative) over the mean model's. The anchor set is
   ``ANCHOR_SIZE`` (128) examples of the training split drawn with ``random.Random(0)``
   (all of it if smaller). The NLL of a σ is estimated with ``SEARCH_SAMPLES`` (4) weight
   samples and the same random numbers for every σ (common random numbers: the search sees
   a smooth curve, not sampling noise). Search: ×4 steps from 1e-3 up (or ÷4 down) until the
   bound is crossed, then ``BISECTION_STEPS`` (6) geometric bisections; σ = 0 (the mean model)
   if even 1e-7 violates it, at most ``MAX_SIGMA`` if nothing does. One-sided, as the paper
   states the constraint (performance may not *degrade* beyond the threshold): a σ whose
   noise lowers the anchor NLL is accepted. The authors' code (bayesian-peft,
   ``modelwrappers/tfblora.py``) bounds the relative change in either direction, with the mean
   model's own predicted classes as labels, by arithmetic bisection between 1e-3 and its
   ``--bayes-beta``; here the labels are the anchor set's own.
5. Storage and prediction: a BLoB adapter (``std_param`` square, ``G = sqrt(σ / d_i)``) in
   ``RUN/adapter/`` plus ``tfb.json`` (σ, the search trace); predicted exactly as ``blob``
   (``--eval-samples``, default 10; 0 = the mean model = the trained LoRA).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Subset

from blob_lora.methods.base import RunSettings
from blob_lora.methods.blob import BlobMethod, blob_config_from
from blob_lora.methods.composite import Assembly, PostHocMethod, training_split_inputs
from blob_lora.models.loading import to_device
from blob_lora.tuners.blob import (
    BlobConfig,
    blob_layers,
    get_blob_model,
    read_adapter_weights,
    sampling,
)
from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INFO_FILE = "tfb.json"
ANCHOR_SIZE = 128
ANCHOR_SEED = 0
SEARCH_SAMPLES = 4
SEARCH_SEED = 1234
NLL_TOLERANCE = 0.003
START_SIGMA = 1e-3
MIN_SIGMA = 1e-7
MAX_SIGMA = 10.0
BISECTION_STEPS = 6


def rotate(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A', B', d)`` with ``B' = U diag(d)``, ``A' = Vᵀ A`` from the SVD ``B = U diag(d) Vᵀ``."""
    u, d, vh = torch.linalg.svd(b.double(), full_matrices=False)
    return (vh @ a.double()).to(a.dtype), (u * d).to(b.dtype), d


def std_param_for(sigma: float, d: torch.Tensor, cols: int) -> torch.Tensor:
    """``G`` (r × cols) with ``G² = σ / d_i`` per row; 0 where ``d_i`` is numerically zero."""
    live = d > d.max().clamp_min(1e-30) * 1e-6
    std = torch.where(live, sigma / d.clamp_min(1e-30), torch.zeros_like(d))
    return std.sqrt()[:, None].expand(-1, cols).contiguous()


def load_rotated(model: nn.Module, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Put the rotated weights of a saved LoRA adapter into a BLoB model; return ``d`` per
    layer."""
    state = read_adapter_weights(adapter_dir)
    singular: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in blob_layers(model):
            key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            if key_a not in state or key_b not in state:
                raise CheckpointError(f"{adapter_dir} has no LoRA weights for {name}")
            a_new, b_new, d = rotate(state[key_a], state[key_b])
            weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if weight_a.shape != a_new.shape or weight_b.shape != b_new.shape:
                raise CheckpointError(f"{adapter_dir}: {name} does not fit this model")
            weight_a.copy_(a_new)
            weight_b.copy_(b_new)
            singular[name] = d
    return singular


def set_sigma(model: nn.Module, singular: dict[str, torch.Tensor], sigma: float) -> None:
    with torch.no_grad():
        for name, layer in blob_layers(model):
            if "default" not in layer.lora_A_rho:
                continue
            rho = layer.lora_A_rho["default"]
            rho.copy_(std_param_for(sigma, singular[name].to(rho.device), rho.shape[1]))


class TfbMethod(PostHocMethod, BlobMethod):
    """A trained LoRA adapter made Bayesian after training (see the module doc).

    Trained as a composite method (its sub-run and assembly); loaded and predicted as BLoB.
    """

    name = "tfb"
    has_kl = False
    reads_sections = frozenset({"blob"})
    # σ comes from the search, on every LoRA layer, as G² (``assemble``); no KL, so no prior
    # and it trains plain LoRA, so BLoB's training noise (flipout) never applies
    ignores_settings = frozenset(
        {"prior_std", "init_std", "std_param", "bayesian_layers", "flipout"}
    )
    sub_method = "lora"  # one plain LoRA run into RUN/lora/
    info_file = INFO_FILE
    step_seconds = "search_seconds"

    def owns(self, model: nn.Module) -> bool:
        # a TFB model is a BLoB model: ``blob`` recognises it and predicts it the same way
        return False

    def assemble(self, assembly: Assembly) -> tuple[nn.Module | None, dict[str, Any]]:
        """Rotate the LoRA adapter into a BLoB one, search σ, store the adapter and σ."""
        cfg = assembly.cfg
        (lora_adapter,) = assembly.sub_adapters
        # every LoRA layer gets a std, parameterised as G² (std_param_for writes G)
        # the std is set by the search, never initialised: the BLoB default init_std keeps a
        # user's --init-std (valid for another std_param) from being refused after training
        blob_config = blob_config_from(
            cfg, std_param="square", bayesian_layers=None, init_std=BlobConfig.init_std
        )
        model = get_blob_model(assembly.base, self.lora_config(cfg), blob_config)
        to_device(model, assembly.device)
        singular = load_rotated(model, lora_adapter)
        info = search_sigma(model, singular, assembly.tokenizer, cfg, progress=assembly.progress)
        set_sigma(model, singular, info["sigma"])
        model.eval()
        model.save_pretrained(assembly.adapter_dir)
        atomic_write_json(assembly.adapter_dir / INFO_FILE, info)
        return model, info


def anchor_indices(n: int, size: int = ANCHOR_SIZE, seed: int = ANCHOR_SEED) -> list[int]:
    """The anchor examples: ``size`` of the ``n`` training examples, fixed by ``seed``."""
    if n <= size:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), size))


@torch.no_grad()
def anchor_nll(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    option_ids: torch.Tensor | None,
    n: int,
) -> float:
    """NLL of the N-sample predictive on the anchor batches, with fixed random numbers."""
    method = BlobMethod()
    torch.manual_seed(SEARCH_SEED)
    total, count = 0.0, 0
    for batch in batches:
        if n == 0:  # the mean model: sampling off explicitly
            with sampling(model, False):
                probs = method.predict_samples(model, batch, option_ids, 0).mean(0)
        else:
            probs = method.predict_samples(model, batch, option_ids, n).mean(0)
        p = probs.gather(1, batch["labels"][:, None]).clamp_min(1e-12)
        total += float(-p.log().sum())
        count += len(batch["labels"])
    return total / max(1, count)


def largest_sigma(ok: Callable[[float], bool]) -> float:
    """The search of the module doc over ``ok(σ)`` (whether σ keeps the anchor NLL within the
    bound): ×4 steps from ``START_SIGMA`` up or ÷4 down, never past ``MAX_SIGMA`` or below
    ``MIN_SIGMA`` (both are tried), then geometric bisection of the bracket; 0 when even
    ``MIN_SIGMA`` fails."""
    good, bad = 0.0, None
    sigma = START_SIGMA
    if ok(sigma):
        good = sigma
        while sigma < MAX_SIGMA:
            sigma = min(sigma * 4.0, MAX_SIGMA)
            if not ok(sigma):
                bad = sigma
                break
            good = sigma
    else:
        bad = sigma
        while sigma > MIN_SIGMA:
            sigma = max(sigma / 4.0, MIN_SIGMA)
            if ok(sigma):
                good = sigma
                break
            bad = sigma
    if good > 0 and bad is not None:
        for _ in range(BISECTION_STEPS):
            mid = math.sqrt(good * bad)
            if ok(mid):
                good = mid
            else:
                bad = mid
    return good


def search_sigma(
    model: nn.Module,
    singular: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    cfg: RunSettings,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """The largest σ whose anchor NLL is within ``NLL_TOLERANCE`` of the mean model's."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    split, inputs = training_split_inputs(cfg, tokenizer, device)
    anchor = Subset(inputs.dataset, anchor_indices(len(inputs.dataset)))
    collate = inputs.collator
    size = cfg.evaluation.eval_batch_size
    batches = [
        {
            k: v.to(device)
            for k, v in collate([anchor[j] for j in range(i, min(i + size, len(anchor)))]).items()
        }
        for i in range(0, len(anchor), size)
    ]
    option_ids = inputs.option_ids
    base_nll = anchor_nll(model, batches, option_ids, 0)
    bound = base_nll * (1.0 + NLL_TOLERANCE)
    trace: list[dict[str, float]] = []

    def ok(sigma: float) -> bool:
        set_sigma(model, singular, sigma)
        nll = anchor_nll(model, batches, option_ids, SEARCH_SAMPLES)
        trace.append({"sigma": sigma, "nll": nll})
        if progress:
            print(f"tfb: sigma {sigma:.3e} anchor nll {nll:.5f} (bound {bound:.5f})")
        return nll <= bound

    good = largest_sigma(ok)
    return {
        "sigma": good,
        "anchor_size": len(anchor),
        "anchor_split": split,
        "anchor_nll_mean_model": base_nll,
        "nll_tolerance": NLL_TOLERANCE,
        "search_samples": SEARCH_SAMPLES,
        "trace": trace,
        "search_seconds": round(time.perf_counter() - start, 3),
    }
