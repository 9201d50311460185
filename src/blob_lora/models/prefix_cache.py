"""Per-example hidden states after a model's frozen blocks, computed once and reused.

With LoRA on the top blocks only (the demo and the experiment configs: 8 of SmolLM2's 30),
the blocks below are frozen and deterministic: their output for an example is the same in
every epoch, for every sample of a Bayesian predictive, and for every method and seed built
on the same base model. Running them once per example and then only the adapted top halves a
CPU training step and cuts an evaluation pass about 3x (``bench/README.md``). The result is
the model's own forward from block ``start`` on (``blob_lora.models.prefix``), so it equals
the uncached forward up to float rounding from a different padding length.

The cache is keyed by the tokenised dataset, the prefix's weights (a sampled fingerprint),
``start`` and dtype; with ``path`` it is also kept on disk (safetensors, written atomically)
so every run of an experiment on the same split shares one computation.

:class:`BatchPrefixCache` serves the other pattern: not a dataset met in ever new batches, but
the same few batch objects forwarded again and again (the support set of a meta-learning
adaptation, ``K`` inner steps on the same batches). It keeps each batch's block output whole,
the very tensor the full forward hands on, so the forwards from it equal the full ones exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blob_lora.models.forward import attention_spans
from blob_lora.models.prefix import (
    PrefixPlan,
    block_index,
    block_lists,
    capture_prefix,
    hidden_of,
    injected_prefix,
)
from blob_lora.tasks.dataset import EncodedDataset
from blob_lora.utils.atomic import atomic_write_bytes

#: Largest cache (all examples' hidden states) built without being asked: it lives in RAM.
AUTO_LIMIT_BYTES = 2 * 1024**3
#: Modules outside the blocks that may be trainable without breaking the prefix (they run
#: after the blocks).
_AFTER_BLOCKS = re.compile(r"(^|\.)(lm_head|score|norm|final_layernorm|ln_f)(\.|$)")
_ADAPTER_PARAM = re.compile(r"(lora_|modules_to_save)")
_FINGERPRINT_VALUES = 2048


def frozen_prefix_length(model: nn.Module) -> int:
    """How many leading blocks have no adapter, no trainable weight and no active dropout.

    0 when there is no such prefix or it cannot be told safely: not exactly one block list, a
    trainable or adapted module before the blocks (e.g. embeddings), or dropout configured in
    the base model while training.
    """
    lists = block_lists(model)
    if len(lists) != 1:
        return 0
    list_name, layers = next(iter(lists.items()))
    if model.training and _base_dropout(model):
        return 0
    first = len(layers)

    def place(name: str) -> bool:
        nonlocal first
        index = block_index(name, list_name)
        if index is not None:
            first = min(first, index)
            return True
        return bool(_AFTER_BLOCKS.search(name))

    for name, p in model.named_parameters():
        if (p.requires_grad or _ADAPTER_PARAM.search(name)) and not place(name):
            return 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0 and not place(name):
            return 0
    return first if first < len(layers) else 0


def _base_dropout(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    values = config.to_dict().items() if hasattr(config, "to_dict") else ()
    return any(
        ("dropout" in k or "pdrop" in k) and isinstance(v, float) and v > 0 for k, v in values
    )


def prefix_plan(model: nn.Module, start: int) -> PrefixPlan:
    """The plan that runs ``model`` from block ``start`` on."""
    (layers,) = block_lists(model).values()
    return PrefixPlan(layers, start)


def prefix_fingerprint(model: nn.Module, start: int) -> str:
    """A digest of what determines the prefix output: the input embeddings and blocks[:start].

    Hashes shapes, dtypes and up to 2048 evenly spaced values of every such weight, so a
    different checkpoint (or precision) never reuses another's cache, without reading
    gigabytes on large models.
    """
    plan = prefix_plan(model, start)
    # The architecture, not the wrapper: a LoRA and a BLoB model on one base share features.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    h = hashlib.sha256(f"{type(base).__name__}:{start}".encode())
    tensors: list[tuple[str, Tensor]] = []
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None:
        tensors += [(f"embed.{n}", p) for n, p in embed.named_parameters()]
    for i in range(start):
        tensors += [(f"{i}.{n}", p) for n, p in plan.layers[i].named_parameters()]
        tensors += [(f"{i}.{n}", b) for n, b in plan.layers[i].named_buffers()]
    for name, t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_VALUES)
        sample = flat[::step][:_FINGERPRINT_VALUES].to("cpu", torch.float64)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


class PrefixFeatureCache:
    """Hidden states after blocks ``[:start]`` for examples of one tokenised dataset.

    Only real tokens are stored (``(length, hidden)`` per example, on the CPU); a batch is
    assembled with zeros at padded positions, which attention masks out. ``keep`` holds every
    example's features once computed (the caller meets the examples again: epochs, a curve
    scored repeatedly, a file to write); without it an example's are dropped once its batch is
    assembled, so a single pass over a dataset holds one batch of features, not the dataset's.
    """

    def __init__(
        self,
        model: nn.Module,
        start: int,
        key: str,
        path: Path | None = None,
        *,
        keep: bool = True,
    ) -> None:
        if start < 1:
            raise ValueError("a prefix cache needs at least one frozen block")
        self.plan = prefix_plan(model, start)
        self.key = key
        self.path = path
        self.keep = keep or path is not None  # what is written must be kept until then
        self.features: dict[int, Tensor] = {}
        self.as_tuple: bool | None = None
        self._dirty = False
        if path is not None:
            self._load(path)

    @classmethod
    def for_dataset(
        cls,
        model: nn.Module,
        dataset: EncodedDataset,
        cache_dir: str | Path | None = None,
        limit_bytes: int = AUTO_LIMIT_BYTES,
        *,
        keep: bool = True,
    ) -> PrefixFeatureCache | None:
        """A cache for ``dataset`` on ``model``, or ``None`` if there is no frozen prefix or
        the features would exceed ``limit_bytes`` of RAM. Only a task split (an ``MCDataset``,
        whose ``digest`` names its content) is kept in ``cache_dir``; other questions (a
        meta-learning task's draw, ``Predictor``'s) are cached in RAM only. ``keep`` as the
        class says."""
        start = frozen_prefix_length(model)
        if start == 0:
            return None
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        dtype = next(model.parameters()).dtype
        if hidden is None:
            return None
        size = sum(dataset.lengths) * int(hidden) * torch.finfo(dtype).bits // 8
        if size > limit_bytes:
            return None
        digest = getattr(dataset, "digest", None)
        fp = prefix_fingerprint(model, start)
        # A model with a sliding window or attention chunks names them in the key: its cloze
        # features before those were cut into the packed mask (2026-12-03) are not reused.
        spans = attention_spans(model)
        layout = f":{spans}" if spans is not None else ""
        key = hashlib.sha256(f"{digest}:{fp}:{start}:{dtype}{layout}".encode()).hexdigest()
        on_disk = cache_dir is not None and digest is not None
        path = Path(cache_dir) / "prefix" / f"{key}.safetensors" if on_disk else None
        return cls(model, start, key, path, keep=keep)

    @property
    def start(self) -> int:
        return self.plan.start

    def _load(self, path: Path) -> None:
        from safetensors import safe_open

        if not path.is_file():
            return
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key:
                    return
                self.as_tuple = json.loads(meta["as_tuple"])
                self.features = {int(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable prefix cache {path}: {exc}", stacklevel=2)
            self.features, self.as_tuple = {}, None

    def save(self) -> None:
        """Write the cache to its path (atomically) if it changed since it was read."""
        if self.path is None or not self._dirty or not self.features:
            return
        from safetensors.torch import save

        meta = {"key": self.key, "as_tuple": json.dumps(bool(self.as_tuple))}
        tensors = {str(k): v.contiguous() for k, v in self.features.items()}
        atomic_write_bytes(self.path, save(tensors, metadata=meta))
        self._dirty = False

    def fill(self, model: nn.Module, batch: dict[str, Tensor], index: Tensor) -> None:
        """Compute and keep the features of the rows of ``batch`` (dataset items ``index``)
        not held yet, in this batch: an example's features carry the float rounding of the
        padding of the batch that computed them, so a caller that must reproduce another
        pass bit for bit computes them in that pass's batches."""
        self._fill(model, batch, [int(i) for i in index.tolist()])

    @torch.no_grad()
    def _fill(self, model: nn.Module, batch: dict[str, Tensor], index: list[int]) -> None:
        missing = [row for row, ix in enumerate(index) if ix not in self.features]
        if not missing:
            return
        rows = torch.tensor(missing, device=batch["input_ids"].device)
        sub = {k: v.index_select(0, rows) for k, v in batch.items() if torch.is_tensor(v)}
        out = capture_prefix(model, self.plan, sub)
        self.as_tuple = isinstance(out, tuple)
        hidden = hidden_of(out)
        mask = sub["attention_mask"].bool()
        for j, row in enumerate(missing):
            self.features[index[row]] = hidden[j][mask[j]].to("cpu", copy=True)
        self._dirty = True

    def output_for(self, model: nn.Module, batch: dict[str, Tensor], index: Tensor) -> Any:
        """The prefix output for ``batch`` (whose rows are dataset items ``index``)."""
        ids = [int(i) for i in index.tolist()]
        self._fill(model, batch, ids)
        mask = batch["attention_mask"].bool()
        first = self.features[ids[0]]
        hidden = torch.zeros((*mask.shape, first.shape[-1]), dtype=first.dtype, device=mask.device)
        for row, ix in enumerate(ids):
            feats = self.features[ix]
            if feats.shape[0] != int(mask[row].sum()):
                raise RuntimeError(
                    f"prefix cache entry {ix} has {feats.shape[0]} tokens but the batch row has "
                    f"{int(mask[row].sum())}: the cache does not belong to this dataset"
                )
            hidden[row][mask[row]] = feats.to(mask.device)
        if not self.keep:
            for ix in ids:
                self.features.pop(ix, None)
        return (hidden,) if self.as_tuple else hidden

    @contextmanager
    def injected(self, model: nn.Module, batch: dict[str, Tensor], index: Tensor) -> Iterator[None]:
        """Within the block, forwards of ``model`` on ``batch`` start at block ``start``."""
        output = self.output_for(model, batch, index)
        with injected_prefix(self.plan, output):
            yield


class BatchPrefixCache:
    """The output of a model's frozen blocks for batches that are forwarded again and again.

    Within :meth:`injected`, a forward of a batch starts at the first adapted block from that
    batch's output of blocks ``[:start]``, computed (without gradients) on its first forward
    and reused for every later forward of the same batch object: an adaptation's ``K`` inner
    steps on one support set run the frozen blocks once. Whether there is a frozen prefix is
    asked (:func:`frozen_prefix_length`) at every forward, in the model's mode of that forward,
    so a model without one (an adapter in the first block, base-model dropout while training)
    simply runs whole. The output is kept whole, padding included: the suffix gets the very
    tensor the full forward would hand it, so results equal the full forward's.

    Batches are told apart by identity (each is held with its output as long as the cache
    lives, so no other object can take its ``id``): build one per adaptation (or per
    meta-training step), not per run.
    """

    def __init__(self) -> None:
        self.start = 0
        self._outputs: dict[int, tuple[dict[str, Tensor], Any]] = {}

    def __len__(self) -> int:
        return len(self._outputs)

    @contextmanager
    def injected(self, model: nn.Module, batch: dict[str, Tensor]) -> Iterator[None]:
        """Within the block, forwards of ``model`` on ``batch`` start at the first adapted
        block when the model has a frozen prefix now; otherwise they run whole."""
        start = frozen_prefix_length(model)
        if start == 0:
            yield
            return
        plan = prefix_plan(model, start)
        if start != self.start:  # outputs of another prefix length are no longer the input
            self._outputs.clear()
            self.start = start
        held = self._outputs.get(id(batch))
        if held is None:
            with torch.no_grad():
                held = (batch, capture_prefix(model, plan, batch))
            self._outputs[id(batch)] = held
        with injected_prefix(plan, held[1]):
            yield
