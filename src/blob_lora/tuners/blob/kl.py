"""Closed-form KL between BLoB's Gaussian posterior on A and its isotropic prior."""

from __future__ import annotations

import math

import torch
from torch import nn

from blob_lora.tuners.blob.layer import BlobLayerMixin, std_from_param


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """Sum over elements of KL(N(mean, std**2) || N(0, prior_std**2)), in float32 or wider."""
    if mean.dtype not in (torch.float32, torch.float64):
        mean, std = mean.float(), std.float()
    var_ratio = (std.square() + mean.square()) / (2.0 * prior_std**2)
    return (math.log(prior_std) - torch.log(std) + var_ratio - 0.5).sum()


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """KL(q(A) || p(A)) summed over every Bayesian ``A`` of the active adapters.

    All layers are handled in one fused expression on concatenated tensors (one kernel per
    operation for the whole model rather than several per layer): at small batches the per-layer
    launches of the authors' KL were a visible share of the step time.
    """
    groups: dict[tuple[str, float], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    device = None
    for module in model.modules():
        if not isinstance(module, BlobLayerMixin):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A_rho:
                continue
            key = (module.blob_std_param[adapter], module.blob_prior_std[adapter])
            means, rhos = groups.setdefault(key, ([], []))
            means.append(module.lora_A[adapter].weight.reshape(-1))
            rhos.append(module.lora_A_rho[adapter].reshape(-1))
            device = means[-1].device
    if not groups:
        return torch.zeros((), device=device)
    total = None
    for (std_param, prior_std), (means, rhos) in groups.items():
        mean = torch.cat(means) if len(means) > 1 else means[0]
        rho = torch.cat(rhos) if len(rhos) > 1 else rhos[0]
        if rho.dtype not in (torch.float32, torch.float64):
            mean, rho = mean.float(), rho.float()
        term = gaussian_kl(mean, std_from_param(rho, std_param), prior_std)
        total = term if total is None else total + term
    return total
