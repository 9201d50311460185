"""The one loop over a dataset: every predictive mode, for evaluation, the learning curve and
``Predictor``.

:func:`predict_dataset` batches a tokenised split, moves each batch to the model's device,
computes its predictive in any mode of ``prediction.fast`` (``predict_batch``) and returns the
per-example results in dataset order. What its callers differ in is a parameter, not a loop:

* evaluation shards the split over processes (``accelerator``; ``gather_for_metrics`` drops
  the duplicates even sharding pads in, so every example counts once) and may start the
  forwards at the first adapted block from cached features (``prefix_cache``, ``fold`` only);
* the learning curve scores one split repeatedly and keeps its features (``feature_cache``);
* ``Predictor`` orders questions by length (``batches``) and seeds the generator itself, so
  iterating its batches draws nothing from the global RNG.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from blob_lora.methods import Method
from blob_lora.models.prefix_cache import PrefixFeatureCache
from blob_lora.prediction.fast import BatchPredictive, EarlyStop, predict_batch, resolve_mode
from blob_lora.prediction.resume import PassCheckpoint
from blob_lora.tasks.dataset import (
    EncodedDataset,
    IndexedCollator,
    IndexedDataset,
    MCCollator,
)

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class DatasetPredictive:
    """Per-example predictive of a dataset, in dataset order (see ``fast.BatchPredictive``).

    ``sample_probs`` (S, N, C) is kept when every batch drew the same number of samples
    (float64, exactly the method's per-sample probabilities); ``mode`` is the mode that ran
    and ``note`` why it differs from the one asked for (empty if it does not).
    """

    probs: Tensor
    labels: Tensor
    n_used: Tensor
    total: Tensor
    aleatoric: Tensor | None
    epistemic: Tensor | None
    sample_probs: Tensor | None
    mode: str
    note: str = ""

    def uncertainty(self) -> dict[str, Tensor]:
        out = {"total": self.total}
        if self.aleatoric is not None and self.epistemic is not None:
            out.update(aleatoric=self.aleatoric, epistemic=self.epistemic)
        return out


def _loader(
    dataset: EncodedDataset,
    collator: MCCollator,
    batch_size: int,
    batches: Sequence[Sequence[int]] | None,
    accelerator: Accelerator | None,
) -> DataLoader:
    indexed, collate = IndexedDataset(dataset), IndexedCollator(collator)
    if batches is None:
        loader = DataLoader(indexed, batch_size=batch_size, shuffle=False, collate_fn=collate)
        return accelerator.prepare_data_loader(loader) if accelerator is not None else loader
    if accelerator is not None:
        raise ValueError("a batch order of the caller's (batches) runs on one process only")
    # a private generator: starting the iteration draws its seed from this one, not the global
    # RNG whose state decides the samples
    return DataLoader(
        indexed, batch_sampler=batches, collate_fn=collate, generator=torch.Generator()
    )


def _columns(res: BatchPredictive, labels: Tensor, index: Tensor) -> dict[str, Tensor]:
    cols = {
        "probs": res.probs,
        "labels": labels.cpu(),
        "n_used": res.n_used,
        "total": res.total,
        "index": index.cpu(),
    }
    if res.aleatoric is not None and res.epistemic is not None:
        cols.update(aleatoric=res.aleatoric, epistemic=res.epistemic)
    return cols


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    method: Method,
    dataset: EncodedDataset,
    collator: MCCollator,
    option_ids: Tensor | None,
    n_samples: int,
    batch_size: int = 8,
    *,
    mode: str = "fold",
    fold: int | None = None,
    early: EarlyStop | None = None,
    batches: Sequence[Sequence[int]] | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = False,
    desc: str = "predict",
    prefix_cache: bool = False,
    cache_dir: str | None = None,
    feature_cache: PrefixFeatureCache | None = None,
    checkpoint: PassCheckpoint | None = None,
) -> DatasetPredictive:
    """The ``n_samples``-sample predictive of every example of ``dataset`` in ``mode``.

    ``batches`` (lists of dataset positions) replaces the default order (``batch_size``
    consecutive examples). With ``prefix_cache`` (``fold`` mode, one process, a method that
    allows it) the frozen blocks below the adapters run once per example, not once per folded
    sample; a task split's features are shared through ``cache_dir`` with other runs on the
    split, other questions' (an ``EncodedDataset``) live in RAM for one batch at a time. A
    caller that scores the same split repeatedly passes its own ``feature_cache`` (a
    ``PrefixFeatureCache`` for this dataset) instead.
    """
    resolved = resolve_mode(method, model, mode, n_samples)
    loader = _loader(dataset, collator, batch_size, batches, accelerator)
    device = next(model.parameters()).device
    cache = feature_cache
    single = accelerator is None or accelerator.num_processes == 1
    if cache is None and prefix_cache and mode == "fold" and single and method.prefix_cacheable:
        # this pass meets each example once: features are kept only to be written to disk
        cache = PrefixFeatureCache.for_dataset(model, dataset, cache_dir, keep=False)
    parts: dict[str, list[Tensor]] = {}
    samples: list[Tensor] | None = []
    resumed = checkpoint.load() if checkpoint is not None else None
    done = 0
    if resumed is not None:
        done = resumed.batches
        print(
            f"{desc}: resuming from {checkpoint.path} ({done} of {len(loader)} batches scored)",
            file=sys.stderr,
        )
        parts = {k: [v] for k, v in resumed.columns.items()}
        samples = [resumed.samples] if resumed.samples is not None else None
    label = f"{desc} ({resolved.mode})"
    with method.frozen(model):  # nothing trains during the pass
        for i, batch in enumerate(tqdm(loader, desc=label, disable=not progress, leave=False)):
            if i < done:  # scored before the stop; collating it again is all it costs
                continue
            if resumed is not None and i == done:
                resumed.restore_rng()  # after the loader's own draw at its start, as then
            idx = batch.pop("index")
            batch = {k: v.to(device) for k, v in batch.items()}
            with cache.injected(model, batch, idx) if cache is not None else nullcontext():
                res = predict_batch(method, model, batch, option_ids, resolved, fold, early)
            cols = _columns(res, batch["labels"], idx)
            if res.sample_probs is not None and samples is not None:
                cols["samples"] = res.sample_probs.transpose(0, 1).contiguous()  # (B, S, C)
            else:
                samples = None
            if accelerator is not None:
                cols = accelerator.gather_for_metrics({k: v.to(device) for k, v in cols.items()})
            if samples is not None:
                samples.append(cols.pop("samples").cpu())
            for k, v in cols.items():
                parts.setdefault(k, []).append(v.cpu())
            if checkpoint is not None and checkpoint.due():
                checkpoint.save(i + 1, parts, samples)
    if resumed is not None and resumed.batches >= len(loader):
        resumed.restore_rng()  # every batch was scored before the stop
    if cache is not None:
        cache.save()
    cat = {k: torch.cat(v) for k, v in parts.items()}
    order = torch.argsort(cat["index"])
    get = {k: v[order] for k, v in cat.items()}
    sample_probs = None
    if samples and len({t.shape[1] for t in samples}) == 1:
        sample_probs = torch.cat(samples)[order].transpose(0, 1).contiguous()
    return DatasetPredictive(
        probs=get["probs"],
        labels=get["labels"],
        n_used=get["n_used"],
        total=get["total"],
        aleatoric=get.get("aleatoric"),
        epistemic=get.get("epistemic"),
        sample_probs=sample_probs,
        mode=resolved.mode,
        note=resolved.note,
    )
