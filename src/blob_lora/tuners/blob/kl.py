"""Closed-form KL between BLoB's Gaussian posterior on A and its isotropic prior."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from blob_lora.tuners.blob.layer import BlobLayerMixin, std_from_param


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """Sum over elements of KL(N(mean, std**2) || N(0, prior_std**2)), in float32 or wider."""
    if mean.dtype not in (torch.float32, torch.float64):
        mean, std = mean.float(), std.float()
    var_ratio = (std.square() + mean.square()) / (2.0 * prior_std**2)
    return (math.log(prior_std) - torch.log(std) + var_ratio - 0.5).sum()


class _Shards:
    """Reads parameters that FSDP2 may have sharded into DTensors: each process takes its own
    shard (``to_local``, differentiable: the gradient lands on that shard), and ``total`` sums
    the per-process KL over the processes once, keeping each shard's gradient its own."""

    def __init__(self) -> None:
        self.mesh: Any = None
        self.plain = False

    def local(self, t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(t, DTensor):
            self.plain = True
            return t
        if not all(isinstance(p, Shard) for p in t.placements) or t.device_mesh.ndim != 1:
            raise ValueError(
                f"the BLoB KL reads FSDP's sharded parameters (Shard on a 1-D mesh), got "
                f"placements {t.placements} on a {t.device_mesh.ndim}-D mesh"
            )
        self.mesh = t.device_mesh
        return t.to_local()

    def total(self, kl: torch.Tensor) -> torch.Tensor:
        if self.mesh is None:
            return kl
        if self.plain:
            raise ValueError("the BLoB parameters are partly sharded (DTensor) and partly not")
        from torch.distributed.tensor import DTensor, Partial

        # the sum over processes; its gradient reaches every process's partial KL unscaled
        return DTensor.from_local(kl, self.mesh, [Partial()], run_check=False).full_tensor()


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """KL(q(A) || p(A)) summed over every Bayesian ``A`` of the active adapters.

    All layers are handled in one fused expression on concatenated tensors (one kernel per
    operation for the whole model rather than several per layer): at small batches the per-layer
    launches of the authors' KL were a visible share of the step time. Under FSDP2 (parameters
    are DTensor shards) each process sums over its shards and the result is the sum over all
    processes (one all-reduce; every process must call it), a plain tensor whose gradient
    reaches each process's own shards only.
    """
    groups: dict[tuple[str, float], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    device = None
    shards = _Shards()
    for module in model.modules():
        if not isinstance(module, BlobLayerMixin):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A_rho:
                continue
            key = (module.blob_std_param[adapter], module.blob_prior_std[adapter])
            means, rhos = groups.setdefault(key, ([], []))
            means.append(shards.local(module.lora_A[adapter].weight).reshape(-1))
            rhos.append(shards.local(module.lora_A_rho[adapter]).reshape(-1))
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
    return shards.total(total)
