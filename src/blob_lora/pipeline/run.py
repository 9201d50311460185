"""Train a run as its method says: the one place that tells plain from composite methods."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blob_lora.methods import get_method
from blob_lora.methods.composite import CompositeMethod
from blob_lora.pipeline.composite import train_composite
from blob_lora.pipeline.plain import train_plain
from blob_lora.training.config import TrainConfig
from blob_lora.training.trainer import RunStart

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


def train(
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    base_model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    finished_runs: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data.task`` into ``cfg.out``, evaluate it; return the summary.

    ``base_model``/``tokenizer`` may be passed in (tests, notebooks) instead of ``cfg.base.model``.
    ``overwrite`` replaces a run already in ``cfg.out``; ``resume`` continues it from its last
    checkpoint (a composite method skips its finished sub-runs). ``finished_runs``: run folders
    a composite method takes as sub-runs, copied, when they trained exactly as a sub-run would
    (``pipeline.composite.share_finished_run``; ``blob-lora compare`` passes its experiment's).
    """
    method = get_method(cfg.method)
    start = RunStart(
        overwrite=overwrite,
        resume=resume,
        progress=progress,
        base_model=base_model,
        tokenizer=tokenizer,
        finished_runs=tuple(Path(p) for p in finished_runs),
    )
    if isinstance(method, CompositeMethod):  # ensemble, laplace, tfb
        return train_composite(cfg, method, start)
    return train_plain(cfg, method, start=start)
