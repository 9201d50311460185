"""Deep ensemble of LoRA adapters (paper baseline: 3 adapters).

Training: ``--ensemble-size`` K plain LoRA runs (method ``lora``, so ``--weight-decay`` and
``--lora-dropout`` apply as given), each with the full training budget, into
``RUN/members/<k>/``. Member k uses seed ``1000 * seed + k``: a different adapter
initialisation *and* a different data order per member, and no member is shared between the
ensembles of different ``--seed`` values (``seed + k`` would make seed 1's second member seed
2's first), so mean ± std over seeds stays a spread over independent ensembles.

``--ensemble-share-seed``: member 0 uses the run's own ``--seed`` instead (members 1.. keep
``1000 * seed + k``), so it *is* the plain LoRA run of that seed with the same settings. A
composite run reuses a finished run whose training settings equal a sub-run's instead of
training it again (``pipeline.composite``; ``blob-lora compare`` offers its experiment's
finished runs), which saves one of the K trainings wherever the experiment also has that LoRA
run. The ensembles of different seeds stay independent (seed s's member 0 is LoRA's seed s,
never another ensemble's member, for seeds below 1001); the ensemble and the LoRA run of one
seed share that member, a paired design. Off by default, so ensembles trained before keep
their members.

Assembly: the members' adapters are copied to ``RUN/adapter/member-<k>/`` (PEFT folders) and
loaded into one ``PeftModel`` as adapters ``m0`` .. ``m<K-1>`` over a single base model.

Prediction: one forward per member; the "samples" of the predictive are the K members'
probabilities, so the predictive is their average and the uncertainty decomposition's
epistemic part is the members' disagreement. ``--eval-samples n`` uses the first
``min(n, K)`` members; unset or 0 means all of them (a mean-weights pass has no meaning here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import PeftModel
from torch import nn

from blob_lora.methods.base import RunSettings, unwrapped
from blob_lora.methods.composite import (
    SHARED_FROM,
    Assembly,
    CompositeMethod,
    SubRun,
    link_tree,
)
from blob_lora.methods.io import load_plain_adapter
from blob_lora.models.forward import answer_logits
from blob_lora.tuners.blob import adapter_state_shapes, read_adapter_weights
from blob_lora.utils.errors import CheckpointError
from blob_lora.utils.settings import check_bool, check_int

MEMBERS_DIR = "members"
MEMBER_PREFIX = "member-"
MEMBER_METHOD = "lora"


@dataclass
class EnsembleConfig:
    """The ensemble's options: ``size`` is ``--ensemble-size`` K (``ensemble``: K LoRA
    adapters, ``multiswag``: K SWAG posteriors), ``share_seed`` is ``--ensemble-share-seed``
    (member 0 trained with the run's own seed, see the module doc); one section of
    ``training.TrainConfig`` (``cfg.ensemble``), read by those two methods only, never by
    their members' runs."""

    KEY_PREFIX: ClassVar[str] = "ensemble_"

    size: int = 3
    share_seed: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a bad value, naming its option."""
        check_int(self, "size")
        check_bool(self, "share_seed")


def member_seed(seed: int, k: int, share_seed: bool = False) -> int:
    """Seed of ensemble member ``k`` of the run with ``--seed seed`` (see module doc)."""
    if share_seed and k == 0:
        return seed
    return 1000 * seed + k


def adapter_name(k: int) -> str:
    return f"m{k}"


def member_dirs(adapter_dir: Path) -> list[Path]:
    """``adapter_dir/member-0 .. member-{K-1}``, checked to be contiguous."""
    adapter_dir = Path(adapter_dir)
    found = sorted(
        (int(p.name[len(MEMBER_PREFIX) :]), p)
        for p in adapter_dir.glob(f"{MEMBER_PREFIX}*")
        if p.is_dir() and p.name[len(MEMBER_PREFIX) :].isdigit()
    )
    if not found:
        raise CheckpointError(f"{adapter_dir} holds no ensemble members ({MEMBER_PREFIX}<k>/)")
    if [k for k, _ in found] != list(range(len(found))):
        raise CheckpointError(
            f"{adapter_dir}: ensemble members are not numbered 0..K-1: {[k for k, _ in found]}"
        )
    return [p for _, p in found]


def ensemble_members(model: nn.Module) -> list[str]:
    """The adapter names of an ensemble model's members, in order."""
    names = getattr(model, "ensemble_adapters", None)
    if not names:
        raise RuntimeError("not an ensemble model (load it with EnsembleMethod.load)")
    return list(names)


class EnsembleMethod(CompositeMethod):
    """K independently initialised LoRA adapters; predictive = mean of their probabilities."""

    name = "ensemble"
    reads_sections = frozenset({"ensemble"})
    samples_by_default = 0  # 0 / unset: all members
    #: the method each member is trained with (``multiswag``: ``swag``)
    member_method: ClassVar[str] = MEMBER_METHOD

    def sub_runs(self, cfg: RunSettings) -> list[SubRun]:
        """K plain runs into ``RUN/members/<k>/``, each with its own seed (see module doc)."""
        return [
            SubRun(
                f"{MEMBERS_DIR}/{k}",
                {
                    "method": self.member_method,
                    "seed": member_seed(cfg.loop.seed, k, cfg.ensemble.share_seed),
                },
            )
            for k in range(cfg.ensemble.size)
        ]

    def assemble(self, assembly: Assembly) -> tuple[nn.Module | None, dict[str, Any]]:
        """Link the members' adapters into ``RUN/adapter/member-<k>/``; every process then
        loads them with :meth:`load`."""
        for k, src in enumerate(assembly.sub_adapters):
            link_tree(src, assembly.adapter_dir / f"{MEMBER_PREFIX}{k}")
        return None, {}

    def summarize(
        self, cfg: RunSettings, sub_summaries: list[dict[str, Any]], record: dict[str, Any]
    ) -> dict[str, Any]:
        members = sub_summaries
        train_seconds = sum(m["train_seconds"] for m in members)
        first = members[0]
        return {
            "method": self.name,
            "task": first["task"],
            "train_split": first["train_split"],
            "n_train": first["n_train"],
            "steps": first["steps"],
            "steps_per_epoch": first["steps_per_epoch"],
            "kl_cycle": None,
            "world_size": first["world_size"],
            "train_seconds": round(train_seconds, 3),
            "seconds_per_step": round(train_seconds / max(1, sum(m["steps"] for m in members)), 4),
            "ensemble_size": cfg.ensemble.size,
            "members": [
                {
                    "index": k,
                    "seed": member_seed(cfg.loop.seed, k, cfg.ensemble.share_seed),
                    "run": f"{MEMBERS_DIR}/{k}",
                    "steps": m["steps"],
                    "train_seconds": m["train_seconds"],
                    **({"shared_from": m[SHARED_FROM]} if SHARED_FROM in m else {}),
                }
                for k, m in enumerate(members)
            ],
        }

    def check_saved(self, adapter_dir: Path, cfg: RunSettings) -> None:
        """As many members as the run trained: a member folder lost from ``RUN/adapter/``
        would otherwise load as a smaller ensemble, without a word."""
        found = len(member_dirs(adapter_dir))
        if found != cfg.ensemble.size:
            raise CheckpointError(
                f"{adapter_dir} holds {found} ensemble members, the run trained "
                f"{cfg.ensemble.size} (--ensemble-size): the adapter is incomplete"
            )

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        """All members as adapters ``m0..`` of one ``PeftModel``, each checked like a run's."""
        dirs = member_dirs(adapter_dir)
        model = load_plain_adapter(base, dirs[0], adapter_name=adapter_name(0))
        for k, path in enumerate(dirs[1:], start=1):
            name = adapter_name(k)
            state = read_adapter_weights(path)
            try:
                model.load_adapter(str(path), adapter_name=name)
            except (RuntimeError, ValueError, OSError) as exc:
                raise CheckpointError(f"ensemble member {path} does not fit: {exc}") from exc
            missing = sorted(set(adapter_state_shapes(model, name)) - set(state))
            if missing:
                raise CheckpointError(f"ensemble member {path} lacks tensors, e.g. {missing[:3]}")
        model.set_adapter(adapter_name(0))
        model.ensemble_adapters = [adapter_name(k) for k in range(len(dirs))]
        model.eval()
        return model

    def owns(self, model: nn.Module) -> bool:
        return bool(getattr(unwrapped(model), "ensemble_adapters", None))

    def eval_samples(self, model: nn.Module, requested: int | None) -> int:
        k = len(ensemble_members(model))
        return k if not requested else min(requested, k)

    @torch.no_grad()
    def predict_samples(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        option_ids: torch.Tensor | None,
        n_samples: int,
        fold: int | None = None,
    ) -> torch.Tensor:
        """(K', B, C): each member's option probabilities (K' = ``eval_samples``)."""
        names = ensemble_members(model)
        use = names if not n_samples else names[: min(n_samples, len(names))]
        peft = model if hasattr(model, "set_adapter") else model.module
        previous = peft.active_adapter
        model.eval()
        probs = []
        try:
            for name in use:
                peft.set_adapter(name)
                probs.append(torch.softmax(answer_logits(model, batch, option_ids), -1))
        finally:
            peft.set_adapter(previous)
        return torch.stack(probs)
