"""Where the std of ``A`` has ended: quantiles over the elements of every Bayesian layer.

Why a run reports it: BLoB's KL can set the std on its own. With the paper's optimiser every
element of every layer ends at one value fixed by the KL schedule, whatever the data say
(README, "Why BLoB equals LoRA with the paper's settings here"), and then the N-sample
predictive adds little over the mean weights (``--eval-samples 0``). A std that the data shaped
spreads across elements and layers. The quantiles show which of the two a run is, without
re-opening its adapter; ``paper/std_report.py`` gives the same per layer for published runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from blob_lora.tuners.blob.model import blob_layers
from blob_lora.utils.dtensor import full_tensors

#: the quantiles reported, as nearest-rank order statistics (exact at any size)
QUANTILES = (0.01, 0.5, 0.99)


def order_quantiles(values: torch.Tensor, quantiles: tuple[float, ...] = QUANTILES) -> list[float]:
    """Nearest-rank quantiles of ``values`` (flattened): the ``round(q (n - 1))``-th smallest.

    ``torch.quantile`` refuses inputs above 2^24 elements; ``kthvalue`` has no such limit and
    returns an element of the data."""
    flat = values.detach().flatten().double()
    n = flat.numel()
    return [float(flat.kthvalue(int(round(q * (n - 1))) + 1).values) for q in quantiles]


def std_of_a(model: nn.Module) -> dict[str, Any]:
    """Per Bayesian layer and active adapter: the std's quantiles (``q01``, ``q50``, ``q99``)
    and the prior std; overall: the lowest ``q01``, the highest ``q99`` and their relative
    spread (``q99 / q01 - 1``: ~0 when one value holds everywhere; None when ``q01`` is 0, a
    std the square parameterisation can reach). Empty for a model without a BLoB std (every
    layer deterministic)."""
    layers: dict[str, dict[str, float]] = {}
    for name, layer in blob_layers(model):
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A_rho:
                continue
            with torch.no_grad():
                std = layer.lora_A_std(adapter)
            std = full_tensors(std)
            q01, q50, q99 = order_quantiles(std)
            key = name if adapter == "default" else f"{name} [{adapter}]"
            layers[key] = {
                "q01": q01,
                "q50": q50,
                "q99": q99,
                "prior_std": float(layer.blob_prior_std[adapter]),
            }
    if not layers:
        return {}
    low = min(v["q01"] for v in layers.values())
    high = max(v["q99"] for v in layers.values())
    spread = high / low - 1.0 if low > 0 else None
    return {"q01": low, "q99": high, "spread": spread, "layers": layers}
