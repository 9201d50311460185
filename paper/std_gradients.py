"""Why BLoB's std of A does not learn from the data (issue 19, step 4): on a trained BLoB run,
the gradient the std parameters get from the data (the NLL of training batches, averaged over
``--batches`` batches) against the one they get from the KL term at the schedule's weights, and
the SGD step each makes at ``kl_lr`` (the paper optimiser steps the std with plain SGD only).

    .venv/bin/python paper/std_gradients.py RUN [--batches 4]

Prints, per term, the RMS gradient over every std parameter and the RMS change one SGD step
at ``kl_lr`` makes to the std itself; writes nothing.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from blob_lora.models.forward import answer_logits
from blob_lora.tasks import get_task, task_inputs
from blob_lora.training.saved_run import load_run
from blob_lora.tuners.blob import kl_divergence
from blob_lora.tuners.blob.layer import std_from_param


def training_inputs(loaded: Any) -> Any:
    """The tokenised training questions of a loaded run (``load_run``), as it trained on them:
    its task, training split, prompt length and scoring."""
    cfg = loaded.config
    task = get_task(cfg.data.task, data_root=cfg.data.data_root)
    return task_inputs(
        task,
        cfg.data.train_split,
        loaded.tokenizer,
        cfg.data.max_length,
        scoring=cfg.data.scoring_spec,
    )


def _rms(tensors: list[torch.Tensor]) -> float:
    total = sum(float(t.pow(2).sum()) for t in tensors)
    return math.sqrt(total / sum(t.numel() for t in tensors))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args(argv)

    loaded = load_run(args.run)
    cfg, model = loaded.config, loaded.model
    inputs = training_inputs(loaded)
    rho = [(n, q) for n, q in model.named_parameters() if "lora_A_rho" in n]
    params = [q for _, q in rho]
    for q in model.parameters():
        q.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    model.train()  # sampling on: the NLL sees the noise, as in training

    torch.manual_seed(0)
    nll_grads = [torch.zeros_like(q) for q in params]
    for b in range(args.batches):
        items = [
            inputs.dataset[i] for i in range(b * cfg.loop.batch_size, (b + 1) * cfg.loop.batch_size)
        ]
        batch = inputs.collator(items)
        logits = answer_logits(model, batch, inputs.option_ids)
        loss = F.cross_entropy(logits, batch["labels"])
        for acc, g in zip(nll_grads, torch.autograd.grad(loss, params), strict=True):
            acc += g / args.batches
    kl_grads = torch.autograd.grad(kl_divergence(model), params)
    stds = [std_from_param(q.detach(), cfg.blob.std_param) for q in params]

    def std_change(grads: list[torch.Tensor], scale: float) -> float:
        new = [
            std_from_param(q.detach() - cfg.kl.kl_lr * scale * g, cfg.blob.std_param) - s
            for q, g, s in zip(params, grads, stds, strict=True)
        ]
        return _rms(new)

    print(
        f"{args.run}: {len(params)} std tensors, mean std {sum(float(s.mean()) for s in stds) / len(stds):.4f}"
    )
    print("| term | RMS gradient on the std parameters | RMS std change of one SGD step at kl_lr |")
    print("|---|---|---|")
    print(
        f"| NLL (data, {args.batches} batches) | {_rms(nll_grads):.3e} | {std_change(nll_grads, 1.0):.3e} |"
    )
    for pi in (1e-3, 0.1, 0.5):
        print(
            f"| pi * KL, pi = {pi:g} | {pi * _rms(kl_grads):.3e} | {std_change(kl_grads, pi):.3e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
