"""The strategy a fine-tuning method implements: what it adds to the model, the loss, prediction.

The harness (tasks, the training loop, checkpoints, evaluation, prediction) is the same for
every method and asks a method only through the hooks of :class:`Method`; nothing outside
``blob_lora.methods`` tests a method's name or looks for a method's attributes on a model. A
method is one subclass in its own module plus its entry in ``methods.registry`` (see
CONTRIBUTING.md, "Adding a method").

The model
    :meth:`~Method.build` wraps a base model for training, :meth:`~Method.load` restores a
    saved adapter, :meth:`~Method.owns` recognises a model this method built or loaded (a
    ``Predictor`` given no method asks the registry, ``methods.registry.method_of``).
The loss
    :attr:`~Method.has_kl` and :meth:`~Method.kl`: a KL term added to the NLL (weighted by the
    KL schedule); :meth:`~Method.weight_decay`: AdamW's decay (a Gaussian prior's MAP).
Along the training iterates
    :meth:`~Method.lr_factor` (the learning-rate schedule), :meth:`~Method.after_step` (called
    after every optimiser step: SWAG collects its moments there), :meth:`~Method.training_state`
    and :meth:`~Method.load_training_state` (what of it a checkpoint must hold so that a resumed
    run equals an uninterrupted one), :meth:`~Method.finish_training` and
    :meth:`~Method.save_extras` (the predictive model after the last step and the files saved
    next to its adapter), :meth:`~Method.training_summary` (what the run's summary reports).
Prediction
    :meth:`~Method.eval_samples` (N), :meth:`~Method.predict_samples` (the N per-sample
    predictives; by default N forwards under :meth:`~Method.sampling_mode`, or one under
    :meth:`~Method.mean_mode` for N = 0), :attr:`~Method.iid_samples` (fresh independent draws
    per call: early stopping may draw a few at a time), :meth:`~Method.stochastic_modules`
    (which modules are random: prediction may run the deterministic blocks below them once),
    :attr:`~Method.prefix_cacheable` (whether the frozen blocks' output may be cached),
    :meth:`~Method.eval_noise` (the kind of weight noise the samples draw, where a method
    offers a choice: BLoB's ``--eval-noise``), :meth:`~Method.frozen` (around a whole
    prediction pass: what is derived from the unchanging parameters may be kept between
    batches).

A method trained as several ordinary runs plus an assembly step (an ensemble, Laplace, TFB) is
a ``methods.composite.CompositeMethod``: it declares its sub-runs instead of ``build``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from peft import PeftModel
from torch import nn

from blob_lora.models.config import BaseModelConfig
from blob_lora.models.forward import answer_logits, repeat_batch
from blob_lora.tasks.config import DataConfig
from blob_lora.tuners.bayesian_lora.config import BayesianLoraConfig
from blob_lora.tuners.blob.config import BlobConfig
from blob_lora.tuners.lora import LoraSettings
from blob_lora.utils.errors import CheckpointError


class LoopSettings(Protocol):
    """The training loop's settings that methods read (``training.config.LoopConfig``)."""

    seed: int
    batch_size: int
    lr: float
    weight_decay: float


class EvalSettings(Protocol):
    """The evaluation settings that methods read (``training.config.EvalConfig``)."""

    eval_batch_size: int
    eval_samples: int | None


class RunSettings(Protocol):
    """The sections of a run's settings that methods read.

    ``blob_lora.training.TrainConfig`` is the one implementation; methods sit on a floor below
    training (training calls them), so the sections training owns are named by the fields
    methods use, and the others by their classes.
    """

    base: BaseModelConfig
    data: DataConfig
    loop: LoopSettings
    evaluation: EvalSettings
    lora: LoraSettings
    blob: BlobConfig
    bayes_lora: BayesianLoraConfig
    #: ``methods.swag.SwagConfig`` and ``methods.ensemble.EnsembleConfig``: not imported here,
    #: those packages import this module (the floor's modules form no cycle)
    swag: Any
    ensemble: Any


@dataclass(frozen=True)
class StepSchedule:
    """How many optimiser steps a run takes, in total and per epoch (the training loop's plan,
    as the training hooks of :class:`Method` see it)."""

    total_steps: int
    steps_per_epoch: int


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a distributed wrapper (``DistributedDataParallel.module``), or itself."""
    return getattr(model, "module", model)


class Method(ABC):
    """One fine-tuning method: the hooks the harness calls (see the module doc)."""

    #: the name ``--method`` takes and ``run_config.json`` stores
    name: ClassVar[str]
    #: whether a KL term (:meth:`kl`) enters the loss, weighted by the KL schedule
    has_kl: ClassVar[bool] = False
    #: N when the user does not ask for a number (0: one deterministic pass)
    samples_by_default: ClassVar[int] = 0
    #: Whether its N = 0 prediction (the posterior's mean weights) is a result of its own that
    #: comparisons report beside the sampled one: ``blob-lora compare`` then accepts the column
    #: ``<name>-mean`` (the paper's "BLoB-Mean"), its runs evaluated once more at N = 0.
    mean_column: ClassVar[bool] = False
    #: Whether :meth:`sampling_mode` makes the forward random at all. Where it does not (plain
    #: LoRA, MAP), N samples would be N copies of one pass at N times the cost, so any N asked
    #: for is taken as N = 0, and the metrics say so (``samples=0``).
    random_predictive: ClassVar[bool] = True
    #: Whether every call of :meth:`predict_samples` draws fresh, independent samples, so that
    #: they may be drawn a few at a time (early-stopped prediction). False for a fixed sample
    #: set such as an ensemble's members.
    iid_samples: ClassVar[bool] = False
    #: Whether evaluation may start forwards at the first adapted block from cached hidden
    #: states (``blob_lora.models.prefix_cache``); True for every method whose predictive
    #: reads (or differentiates, as Laplace's GLM does) the adapted blocks only, however many
    #: samples it folds into the batch. A method that needs the frozen blocks' own forward
    #: (e.g. gradients to the input embeddings) must set it False.
    prefix_cacheable: ClassVar[bool] = True
    #: Whether it learns from a collection of tasks (``blob-lora meta-train``) rather than
    #: from one task: ``train`` refuses it and points there (ABMLL).
    meta_learned: ClassVar[bool] = False
    #: Why it cannot train with its parameters sharded by FSDP2, or ``None`` where it can:
    #: ``train`` refuses such a launch with this reason before the model loads or the run
    #: folder is made, and the other methods' refusals list the ones that can.
    fsdp_refusal: ClassVar[str | None] = None
    #: The method-specific groups of settings it reads (``TrainConfig``'s sections ``kl``,
    #: ``blob``, ``bayes_lora``, ``swag``, ``ensemble``); every method reads the others (model,
    #: data, loop, LoRA, evaluation). Why declared: ``blob-lora train`` says which of the
    #: settings a user gave change nothing for the method (``--prior-std`` for ``lora``).
    reads_sections: ClassVar[frozenset[str]] = frozenset()
    #: settings of those sections it does not read all the same (TFB sets BLoB's std itself)
    ignores_settings: ClassVar[frozenset[str]] = frozenset()

    # --- the model --------------------------------------------------------------------------

    @abstractmethod
    def build(self, base: nn.Module, cfg: RunSettings) -> PeftModel:
        """``base`` wrapped with this method's trainable adapter, as the run's settings say."""

    @abstractmethod
    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        """The predictive model saved in ``adapter_dir`` (``RUN/adapter/``), on ``base``."""

    def check_saved(self, adapter_dir: Path, cfg: RunSettings) -> None:
        """Refuse a saved adapter that cannot be the one the run's settings made (before the
        base model is loaded); nothing to check by default."""
        return None

    def posterior_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors of a posterior ``model`` carries beside its weights (not in its
        ``state_dict``: Laplace's factors, SWAG's moments), by name; what a saved evaluation
        progress is keyed on besides the weights. None by default."""
        return {}

    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` is one this method built or loaded, recognised by what it
        carries; ``methods.registry.method_of`` asks every method in registry order."""
        return False

    # --- the loss ---------------------------------------------------------------------------

    def kl(self, model: nn.Module) -> torch.Tensor | None:
        """The KL term of the loss (read only when :attr:`has_kl`)."""
        return None

    def weight_decay(self, cfg: RunSettings) -> float:
        """AdamW's weight decay for this run."""
        return cfg.loop.weight_decay

    def training_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """A run's flat settings (``TrainConfig.to_dict()``) in the form that decides what its
        training computes: two runs whose forms are equal train the same, so a composite run
        may take one as the other's sub-run (``pipeline.composite.training_differences``).
        By default the settings as they are; a method whose setting provably changes nothing
        (LoRA's weight decay where it rounds away) says so here."""
        return settings

    # --- along the training iterates --------------------------------------------------------

    def lr_factor(
        self, cfg: RunSettings, schedule: StepSchedule, factor: Callable[[int], float]
    ) -> Callable[[int], float]:
        """The learning-rate factor of the 0-based optimiser step, given the run's own
        (warm-up, then linear decay); called once before the first step, so it may also refuse
        a schedule the method cannot use (``ConfigError``). By default the run's own."""
        return factor

    def after_step(
        self, model: nn.Module, cfg: RunSettings, step: int, schedule: StepSchedule
    ) -> None:
        """Called on every process after optimiser step ``step`` (1-based) has updated
        ``model`` (unwrapped), before any checkpoint of that step is written."""
        return None

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors of this method's own training state that a checkpoint must hold beside the
        trainable weights (nothing by default)."""
        return {}

    def load_training_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`training_state` returned (from a resumed checkpoint)."""
        if state:
            raise CheckpointError(
                f"the checkpoint holds training state {sorted(state)[:3]} that method "
                f"{self.name!r} does not keep (written by another method?)"
            )

    def finish_training(self, model: nn.Module) -> None:
        """Turn the last iterate into the predictive model (after the final checkpoint,
        before the adapter is saved and evaluated); by default the last iterate is it."""
        return None

    def training_summary(
        self, model: nn.Module, cfg: RunSettings, schedule: StepSchedule
    ) -> dict[str, object]:
        """Entries this method adds to the run's ``summary.json`` (e.g. what SWAG collected)."""
        return {}

    def save_extras(self, model: nn.Module, adapter_dir: Path) -> None:
        """Write this method's files next to the saved PEFT adapter (``adapter_dir`` is the
        temporary folder that becomes ``RUN/adapter/``); nothing by default."""
        return None

    # --- prediction -------------------------------------------------------------------------

    def samples_asked_by(self, cfg: RunSettings) -> int | None:
        """The N that the settings ``cfg`` ask for: ``--eval-samples``, or, where it is unset
        and the method's adapter keeps an N of its own (BLoB's, Bayesian-LoRA's), that
        default as a new run of these settings gets it; otherwise ``None`` (the method resolves
        it from the model alone: an ensemble's members). Why: a trained adapter keeps the N of
        the settings it was trained under, so a run evaluated again under settings that no
        longer name an N must be asked for the default explicitly, or it would keep its own."""
        return cfg.evaluation.eval_samples

    def eval_samples(self, model: nn.Module, requested: int | None) -> int:
        """N for prediction: ``requested``, or this method's (or this model's) default; 0 for
        a method whose forward is never random (:attr:`random_predictive`)."""
        if not self.random_predictive:
            return 0
        return self.samples_by_default if requested is None else requested

    @contextmanager
    def mean_mode(self, model: nn.Module) -> Iterator[None]:
        """Put the model in its deterministic (N = 0) state; by default it already is."""
        yield

    @contextmanager
    def sampling_mode(self, model: nn.Module, n_samples: int) -> Iterator[None]:
        """Put the model in the state that draws one predictive sample per sequence."""
        yield

    @contextmanager
    def eval_noise(self, model: nn.Module, kind: str | None) -> Iterator[str | None]:
        """Within the block, the samples of :meth:`sampling_mode` draw weight noise of ``kind``
        (``None``: the model's own setting). Yields the kind in force, which the metrics name,
        or ``None`` for a method without such a choice; by default ``kind`` is ignored."""
        yield None

    @contextmanager
    def frozen(self, model: nn.Module) -> Iterator[None]:
        """Within the block the model's parameters do not change (a prediction pass over a
        dataset), so a method may keep what it derives from them from batch to batch instead
        of deriving it again for each; by default there is nothing to keep."""
        yield

    def stochastic_modules(self, model: nn.Module) -> list[str] | None:
        """Qualified names of the modules whose forward is random under ``sampling_mode``.

        Prediction may then run everything before the first of them once and reuse it for all
        samples (``blob_lora.prediction``). ``None`` means unknown: the whole forward is random.
        """
        return None

    @torch.no_grad()
    def predict_samples(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        option_ids: torch.Tensor | None,
        n_samples: int,
        fold: int | None = None,
    ) -> torch.Tensor:
        """(S, B, C) option probabilities; S = max(1, n_samples).

        With ``fold`` > 1 that many samples share one forward (sample index folded into the
        batch), which is much faster than a loop where memory allows.
        """
        model.eval()
        n = max(1, n_samples)
        if n_samples == 0:
            with self.mean_mode(model):
                return torch.softmax(answer_logits(model, batch, option_ids), -1).unsqueeze(0)
        fold = max(1, min(fold or n, n))
        chunks = []
        with self.sampling_mode(model, n_samples):
            done = 0
            while done < n:
                k = min(fold, n - done)
                logits = answer_logits(model, repeat_batch(batch, k), option_ids)
                chunks.append(torch.softmax(logits, -1).view(k, -1, logits.shape[-1]))
                done += k
        return torch.cat(chunks)
