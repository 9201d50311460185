"""Laplace-LoRA baseline: post-hoc KFAC Laplace over LoRA weights with a linearised predictive.

Use::

    la = LaplaceLoRA(peft_model, logits_fn)          # logits_fn(model, batch) -> (B, C)
    la.fit(train_batches)                             # batches carry "labels" (B,)
    la.optimize_prior_precision()                     # evidence over a log grid
    probs = la.predictive(batch)                      # probit; or n_samples=10 for MC
"""

from blob_lora.methods.laplace.kfac import KronAccumulator, trainable_linears
from blob_lora.methods.laplace.laplace_lora import DEFAULT_GRID, LaplaceLoRA
from blob_lora.methods.laplace.posterior import KronLayer

__all__ = ["DEFAULT_GRID", "KronAccumulator", "KronLayer", "LaplaceLoRA", "trainable_linears"]
