"""BLoB inside the Hugging Face ``transformers.Trainer``.

An existing Trainer script becomes BLoB with two changes: wrap the model with
``blob_lora.get_blob_model(...)`` and construct ``BlobTrainer`` instead of ``Trainer`` (the
BLoB options are extra keyword arguments, all with the paper's defaults). What changes:

* **Loss** (``compute_loss``): the model's own loss plus ``pi * KL`` (the closed-form KL of
  every Bayesian ``A``), counted once per optimiser step whatever the gradient accumulation.
  ``pi`` comes from the project's KL schedules (``blob_lora.training.kl_schedule``; default the
  paper's geometric schedule with dataset rescaling) with the training-set size and the global
  batch the Trainer really trains with (its ``get_total_train_batch_size``: the batch after
  DataParallel and ``auto_find_batch_size``, times accumulation and data-parallel processes),
  at the Trainer's optimiser step. ``kl`` and ``pi`` (their means over the logging
  window) are logged next to ``loss``.
* **Optimiser** (``create_optimizer``): ``optimizer="single"`` (default) builds the optimiser
  the Trainer would (``args.optim``, learning rate, betas, eps, weight decay) with the std
  parameters (``lora_A_rho``) in a group of their own at ``std_lr`` without weight decay.
  ``optimizer="paper"`` is the authors' update (``blob_lora.training.optim``, mode ``paper``):
  AdamW on the NLL for the mean and ``B``, then plain SGD at ``kl_lr`` on ``pi * KL`` for every
  trainable tensor, the std stepped only by that SGD (on NLL + KL). It is one optimiser object
  (``BlobPaperAdamW``), so the Trainer schedules, clips, checkpoints and loss-scales it like
  any other; the SGD learning rate follows the Trainer's schedule.
* **Evaluation** (``prediction_step``): with ``eval_samples`` N > 0 the prediction is the
  average of the softmax of N forwards, each with an independent weight sample per sequence
  (or the authors' token-wise Flipout, when the model's ``BlobConfig.eval_noise`` is "token");
  the returned "logits" are the log of that averaged predictive (so ``compute_metrics``, argmax
  or softmax, works unchanged) and ``eval_loss`` is its NLL (labels shifted for causal LMs,
  subclasses and ``trust_remote_code`` models included; a ``compute_loss_func`` gets the
  averaged predictive as the model's own output class). N defaults to the model's
  ``BlobConfig.eval_samples``. Averaging softmaxes is only the predictive of a categorical
  head: regression and multi-label heads are refused with N > 0 (use N = 0).
  N = 0 is exactly the Trainer's own step on the mean weights (BLoB-Mean, as plain LoRA).

Nothing in ``transformers`` is patched: this is a ``Trainer`` subclass and one optimiser class.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.utils import ModelOutput

from blob_lora.training.kl_schedule import KL_SCHEDULES, KLSchedule, make_schedule
from blob_lora.training.optim import OPTIMIZER_MODES, split_parameters
from blob_lora.training.sections import VariationalConfig
from blob_lora.tuners.blob import (
    blob_layers,
    kl_divergence,
    predictive_noise_mode,
    predictive_samples,
    sampling,
)
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.rng import forked_rng

PAPER_KL_LR = VariationalConfig.kl_lr  # the authors' KL SGD learning rate (0.01)

__all__ = ["BlobPaperAdamW", "BlobTrainer"]


def _positive_float(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


def _check_eval_samples(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"eval_samples must be an integer >= 0 (0: the mean weights), got {value!r}"
        )
    return value


def _validate(
    *,
    kl_schedule: Any,
    kl_rescale: Any,
    kl_gamma: Any,
    eval_samples: Any,
    optimizer: Any,
    std_lr: Any,
    kl_lr: Any,
    kl_n_train: Any,
) -> None:
    if kl_schedule not in KL_SCHEDULES:
        raise ConfigError(f"kl_schedule must be one of {KL_SCHEDULES}, got {kl_schedule!r}")
    if not isinstance(kl_rescale, bool):
        raise ConfigError(f"kl_rescale must be True or False, got {kl_rescale!r}")
    _positive_float("kl_gamma", kl_gamma)
    _check_eval_samples(eval_samples)
    if optimizer not in OPTIMIZER_MODES:
        raise ConfigError(
            f"optimizer must be one of {OPTIMIZER_MODES}, got {optimizer!r} (a torch optimiser "
            "of your own goes in Trainer's optimizers=(optimizer, scheduler))"
        )
    _positive_float("std_lr", std_lr, allow_none=True)
    _positive_float("kl_lr", kl_lr, allow_none=True)
    # each learning rate belongs to one mode: set in the other, it would be silently unused
    if optimizer == "paper" and std_lr is not None:
        raise ConfigError(
            'std_lr is the std group\'s learning rate in optimizer="single"; in "paper" the std '
            "is stepped by the KL SGD at kl_lr: pass kl_lr instead"
        )
    if optimizer == "single" and kl_lr is not None:
        raise ConfigError(
            'kl_lr is the KL SGD\'s learning rate in optimizer="paper"; in "single" the std '
            "group's learning rate is std_lr: pass std_lr instead"
        )
    if kl_n_train is not None and (
        isinstance(kl_n_train, bool) or not isinstance(kl_n_train, int) or kl_n_train < 1
    ):
        raise ConfigError(f"kl_n_train must be an integer >= 1, got {kl_n_train!r}")


class _KLMeter:
    """Sums the KL and its weight over the optimiser steps of one logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.kl: torch.Tensor | float = 0.0
        self.pi = 0.0
        self.count = 0

    def add(self, kl: torch.Tensor, pi: float) -> None:
        self.kl = self.kl + kl.detach().float()  # no host sync until the log
        self.pi += pi
        self.count += 1

    def pop(self) -> dict[str, float]:
        if not self.count:
            return {}
        out = {"kl": float(self.kl) / self.count, "pi": self.pi / self.count}
        self.reset()
        return out


class BlobPaperAdamW(torch.optim.AdamW):
    """The authors' BLoB update as one optimiser (``blob_lora.training.optim``, mode ``paper``).

    ``step``: AdamW on the current (NLL) gradients of the mean and ``B`` (``point_groups``);
    then plain SGD, at the current learning rate of the std group, on ``grad(pi * KL)`` for
    every parameter, the std parameters on their NLL gradient plus ``grad(pi * KL)``. The std
    group's learning rate starts at ``kl_lr``; an LR scheduler scales it like the AdamW groups
    (the authors' KL SGD has the same warmup and decay). ``kl_fn`` returns the KL, ``weight_fn``
    its weight ``pi`` for this step, ``on_kl(kl, pi)`` is told both.

    The KL gradient is computed inside ``step`` with ``autograd.grad`` (no DDP hook fires for
    it: it is identical on every process). Under fp16 a ``GradScaler`` unscales every
    gradient, the std's included, before calling ``step``, and skips the whole update when one
    of them overflowed, so the KL enters unscaled, consistently with the NLL.
    """

    def __init__(
        self,
        point_groups: list[dict[str, Any]],
        std_params: list[nn.Parameter],
        *,
        lr: float,
        kl_lr: float,
        kl_fn: Callable[[], torch.Tensor],
        weight_fn: Callable[[], float],
        on_kl: Callable[[torch.Tensor, float], None] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        groups = [{**g, "blob_role": "point"} for g in point_groups if g["params"]]
        groups.append({"params": list(std_params), "lr": kl_lr, "weight_decay": 0.0})
        groups[-1]["blob_role"] = "std"
        # not fused: GradScaler must unscale the gradients in place before step() reads them
        super().__init__(
            groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=False
        )
        self.kl_fn, self.weight_fn, self.on_kl = kl_fn, weight_fn, on_kl

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        point = [p for g in self.param_groups if g["blob_role"] == "point" for p in g["params"]]
        std_group = next(g for g in self.param_groups if g["blob_role"] == "std")
        std = list(std_group["params"])
        std_nll = [p.grad for p in std]
        for p in std:
            p.grad = None  # AdamW skips parameters without a gradient: the std is SGD's alone
        try:
            super().step()
        finally:
            for p, g in zip(std, std_nll, strict=True):
                p.grad = g
        pi = float(self.weight_fn())
        with torch.enable_grad():
            kl = self.kl_fn()
            grads = torch.autograd.grad(pi * kl, point + std, allow_unused=True)
        sgd_lr = std_group["lr"]
        with torch.no_grad():
            for p, g in zip(point, grads[: len(point)], strict=True):
                if g is not None:  # SGD sees only the KL gradient on mean and B ...
                    p.add_(g, alpha=-sgd_lr)
            for p, g_nll, g in zip(std, std_nll, grads[len(point) :], strict=True):
                total = g if g_nll is None else (g_nll if g is None else g_nll + g)
                if total is not None:  # ... and NLL + KL on the std
                    p.add_(total, alpha=-sgd_lr)
        if self.on_kl is not None:
            self.on_kl(kl.detach(), pi)
        return loss


class BlobTrainer(Trainer):
    """``transformers.Trainer`` for a BLoB model (see the module docstring).

    Use it as ``Trainer`` with a model from ``blob_lora.get_blob_model``; the BLoB options are
    keyword-only and have the paper's defaults:

    Args:
        kl_schedule: ``"geometric"`` (the authors'), ``"uniform"`` or ``"elbo"`` (pi = 1/n);
            see ``blob_lora.training.kl_schedule``.
        kl_rescale: the authors' dataset rescaling of the KL cycle,
            ``K = int(100 * n^(pi/gamma) / global_batch)``; ``False``: K = steps per epoch.
        kl_gamma: gamma of that rescaling (paper: 8).
        eval_samples: weight samples N averaged by ``evaluate``/``predict`` (0: the mean;
            default: the model's ``BlobConfig.eval_samples``).
        optimizer: ``"single"`` (one optimiser on NLL + pi * KL) or ``"paper"``
            (``BlobPaperAdamW``: AdamW on the NLL, SGD at ``kl_lr`` on pi * KL; needs an AdamW
            ``args.optim``). A torch optimiser of your own goes in ``optimizers=`` as usual and
            must hold the std parameters.
        std_lr: learning rate of the std parameters in ``"single"`` (default:
            ``args.learning_rate``); refused in ``"paper"``, where it would do nothing.
        kl_lr: the KL SGD's learning rate in ``"paper"`` (default: the paper's 0.01); refused
            in ``"single"``, where it would do nothing.
        kl_n_train: the training-set size n for the schedule when ``train_dataset`` has no
            length (a streaming dataset).
    """

    def __init__(
        self,
        *args: Any,
        kl_schedule: str = "geometric",
        kl_rescale: bool = True,
        kl_gamma: float = 8.0,
        eval_samples: int | None = None,
        optimizer: str = "single",
        std_lr: float | None = None,
        kl_lr: float | None = None,
        kl_n_train: int | None = None,
        **kwargs: Any,
    ) -> None:
        _validate(
            kl_schedule=kl_schedule,
            kl_rescale=kl_rescale,
            kl_gamma=kl_gamma,
            eval_samples=0 if eval_samples is None else eval_samples,
            optimizer=optimizer,
            std_lr=std_lr,
            kl_lr=kl_lr,
            kl_n_train=kl_n_train,
        )
        self.kl_schedule_kind = kl_schedule
        self.kl_rescale = kl_rescale
        self.kl_gamma = float(kl_gamma)
        self.eval_samples = eval_samples  # None until the model is known (below)
        self.optimizer_mode = optimizer
        self.std_lr = std_lr
        self.kl_lr = PAPER_KL_LR if kl_lr is None else float(kl_lr)
        self.kl_n_train = kl_n_train
        self._kl_meter = _KLMeter()
        super().__init__(*args, **kwargs)
        if self.model is not None and not any(True for _ in blob_layers(self.model)):
            raise ConfigError(
                "BlobTrainer needs a BLoB model: wrap it with blob_lora.get_blob_model(model, "
                "LoraConfig(...), BlobConfig(...)) (it has no BLoB layer)"
            )
        if self.eval_samples is None:
            self.eval_samples = predictive_samples(self.model) if self.model is not None else 0
        if self.eval_samples > 0 and self.model is not None:
            _check_softmax_head(self.model, None)

    # ---- the KL weight ---------------------------------------------------------------------

    def kl_schedule(self) -> KLSchedule:
        """The KL schedule for the current ``train_dataset`` and batch layout."""
        n = self.kl_n_train
        if n is None:
            try:
                n = len(self.train_dataset)  # type: ignore[arg-type]
            except TypeError:
                raise ConfigError(
                    "the KL schedule needs the training-set size: train_dataset is missing or "
                    "has no length (a streaming dataset?); pass kl_n_train=<number of examples>"
                ) from None
        args = self.args
        ga = args.gradient_accumulation_steps
        # The Trainer's own count: its batch after DataParallel and auto_find_batch_size
        # (_train_batch_size), times the data-parallel processes (not TP/CP/SP ranks).
        global_batch = self.get_total_train_batch_size(args)
        per_micro = global_batch // ga
        micro = n // per_micro if args.dataloader_drop_last else math.ceil(n / per_micro)
        steps_per_epoch = max(1, math.ceil(micro / ga))
        return make_schedule(
            self.kl_schedule_kind, n, steps_per_epoch, global_batch, self.kl_rescale, self.kl_gamma
        )

    def kl_weight(self) -> float:
        """pi for the optimiser step in progress (the Trainer's ``global_step`` + 1)."""
        return self.kl_schedule().weight(self.state.global_step + 1)

    # ---- training --------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The model's loss, plus ``pi * KL`` in training with ``optimizer="single"``."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training or self.optimizer_mode != "single":
            return result
        loss, outputs = result if return_outputs else (result, None)
        pi = self.kl_weight()
        kl = kl_divergence(model)
        term = pi * kl
        if self._loss_scaled_for_ga(num_items_in_batch):
            # training_step will not divide this micro-batch's loss by the accumulation steps,
            # so the KL's share is divided here: it counts once per optimiser step.
            term = term / getattr(self, "current_gradient_accumulation_steps", 1)
        self._kl_meter.add(kl, pi)
        loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        # Trainer.training_step's own rule for whether it divides the loss by the GA steps.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        point, std = split_parameters(opt_model)
        if self.optimizer is not None or not std:  # the user's optimiser / nothing Bayesian
            optimizer = super().create_optimizer(model)
            inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
            if std and self.optimizer_mode == "paper" and not isinstance(inner, BlobPaperAdamW):
                raise ConfigError(
                    'optimizer="paper" needs BlobTrainer\'s own BlobPaperAdamW (the KL enters '
                    'through it, not through the loss): drop optimizers=(...) or use "single"'
                )
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            missing = [p for p in std if id(p) not in held]
            if missing:
                raise ConfigError(
                    f"the optimizer passed to BlobTrainer misses {len(missing)} BLoB std "
                    "parameters (lora_A_rho): they would never train; include every trainable "
                    "parameter, or let BlobTrainer build the optimizer"
                )
            return optimizer
        args = self.args
        decay = set(self.get_decay_parameter_names(opt_model))
        names = {id(p): n for n, p in opt_model.named_parameters()}
        point_groups = [
            {
                "params": [p for p in point if names[id(p)] in decay],
                "weight_decay": args.weight_decay,
            },
            {"params": [p for p in point if names[id(p)] not in decay], "weight_decay": 0.0},
        ]
        point_groups = [g for g in point_groups if g["params"]]
        if self.optimizer_mode == "paper":
            if not str(getattr(args.optim, "value", args.optim)).startswith("adamw_torch"):
                raise ConfigError(
                    f'optimizer="paper" is AdamW + SGD (BlobPaperAdamW); args.optim={args.optim!r} '
                    'cannot be honoured: use an adamw_torch optim or optimizer="single"'
                )
            self.optimizer = BlobPaperAdamW(
                point_groups,
                std,
                lr=args.learning_rate,
                kl_lr=self.kl_lr,
                kl_fn=lambda: kl_divergence(opt_model),
                weight_fn=self.kl_weight,
                on_kl=self._kl_meter.add,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
            )
            return self.optimizer
        cls_and_kwargs = getattr(self, "optimizer_cls_and_kwargs", None)
        if cls_and_kwargs is None:
            cls_and_kwargs = self.get_optimizer_cls_and_kwargs(args, opt_model)
        optimizer_cls, optimizer_kwargs = cls_and_kwargs
        own_grouping = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if own_grouping or not (
            isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
        ):
            raise ConfigError(
                f"args.optim={args.optim!r} builds its own parameter groups; BlobTrainer needs "
                "the std parameters in a group of their own: use an AdamW-style optim"
            )
        std_group = {
            "params": std,
            "weight_decay": 0.0,  # decay would pull the std towards 0, against the KL
            "lr": self.std_lr if self.std_lr is not None else args.learning_rate,
        }
        self.optimizer = optimizer_cls(point_groups + [std_group], **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the window's KL and its weight
            logs.update(self._kl_meter.pop())
        super().log(logs, start_time)

    # ---- evaluation ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _samples(self, eval_samples: int | None) -> Iterator[None]:
        saved = self.eval_samples
        if eval_samples is not None:
            self.eval_samples = _check_eval_samples(eval_samples)
        try:
            yield
        finally:
            self.eval_samples = saved

    def evaluate(self, *args: Any, eval_samples: int | None = None, **kwargs: Any) -> Any:
        """``Trainer.evaluate``; ``eval_samples`` overrides the trainer's N for this call.

        During training the weight samples are drawn under a forked RNG, so that evaluating
        (``eval_strategy``) does not change the training run's noise.
        """
        with self._samples(eval_samples), self._training_rng_kept():
            return super().evaluate(*args, **kwargs)

    def _training_rng_kept(self) -> contextlib.AbstractContextManager:
        return forked_rng(self.model, enabled=self.is_in_train)

    def predict(self, *args: Any, eval_samples: int | None = None, **kwargs: Any) -> Any:
        """``Trainer.predict``; ``eval_samples`` overrides the trainer's N for this call."""
        with self._samples(eval_samples):
            return super().predict(*args, **kwargs)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """N > 0: log of the mean softmax of N weight samples, and its NLL; N = 0: the mean."""
        n = self.eval_samples
        if n == 0:
            with sampling(model, False):
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        has_labels = bool(self.label_names) and all(
            inputs.get(k) is not None for k in self.label_names
        )
        inputs = self._prepare_inputs(inputs)
        labels = None
        if has_labels:
            labels = tuple(inputs[k].detach() for k in self.label_names)
            labels = labels[0] if len(labels) == 1 else labels
        _check_softmax_head(model, labels)
        log_mean = outputs = None
        with torch.no_grad(), sampling(model, True, mode=predictive_noise_mode(model)):
            for _ in range(n):
                with self.compute_loss_context_manager():
                    outputs = model(**inputs)
                logits = outputs["logits"] if isinstance(outputs, dict) else None
                if logits is None:
                    raise ConfigError(
                        "eval_samples > 0 averages class probabilities, but the model returns "
                        "no 'logits'; use eval_samples=0"
                    )
                log_p = torch.log_softmax(logits.float(), dim=-1)
                log_mean = log_p if log_mean is None else torch.logaddexp(log_mean, log_p)
        log_mean = log_mean - math.log(n)
        loss = None
        if has_labels:
            loss = self._predictive_nll(model, log_mean, labels, outputs).detach()
        if prediction_loss_only:
            return (loss, None, None)
        return (loss, log_mean, labels)

    def _predictive_nll(
        self, model: nn.Module, log_probs: torch.Tensor, labels: Any, outputs: Any
    ) -> torch.Tensor:
        """Mean NLL of the averaged predictive: the model's loss convention on log-probs."""
        if self.compute_loss_func is not None:
            # what the Trainer hands it: the model's output class (``outputs.logits`` works),
            # and no item count at evaluation
            # (a copy of the last sample's output with the logits replaced: a custom output
            # class may require fields of its own)
            if isinstance(outputs, ModelOutput):
                predictive = copy.copy(outputs)
                predictive["logits"] = log_probs
            else:
                predictive = {"logits": log_probs}
            return self.compute_loss_func(predictive, labels, num_items_in_batch=None)
        if not isinstance(labels, torch.Tensor):
            raise ConfigError("eval_samples > 0 needs a single label tensor for its eval loss")
        # position i predicts token i + 1, where there are positions: a causal LM's subclass
        # may return one row of class logits per example (labels (B,), logits (B, C))
        if _is_causal_lm(model) and labels.dim() >= 2 and log_probs.dim() == labels.dim() + 1:
            log_probs, labels = log_probs[..., :-1, :], labels[..., 1:]
        return F.nll_loss(
            log_probs.reshape(-1, log_probs.shape[-1]),
            labels.reshape(-1).to(log_probs.device),
            ignore_index=-100,
        )


def _unwrapped(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    return inner


def _is_kind(model: nn.Module, auto_class: str, mapping_names: Any, peft_class: type) -> bool:
    """Whether ``model`` is an ``auto_class`` model: PEFT's task wrapper says so, or a class of
    the base model's MRO is one transformers maps there (a user's subclass counts), or its
    config's ``auto_map`` names the class (``trust_remote_code`` models)."""
    outer = getattr(model, "module", model)
    if isinstance(outer, peft_class):
        return True
    inner = _unwrapped(model)
    known = set(mapping_names.values())
    if any(cls.__name__ in known for cls in type(inner).__mro__):
        return True
    remote = (getattr(getattr(inner, "config", None), "auto_map", None) or {}).get(auto_class)
    remote = remote if isinstance(remote, list | tuple) else [remote]
    return any(isinstance(r, str) and r.rsplit(".", 1)[-1] == type(inner).__name__ for r in remote)


def _is_causal_lm(model: nn.Module) -> bool:
    from peft import PeftModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return _is_kind(
        model, "AutoModelForCausalLM", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, PeftModelForCausalLM
    )


def _is_sequence_classifier(model: nn.Module) -> bool:
    from peft import PeftModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    return _is_kind(
        model,
        "AutoModelForSequenceClassification",
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        PeftModelForSequenceClassification,
    )


def _check_softmax_head(model: nn.Module, labels: Any) -> None:
    """Refuse N > 0 where the head is not a categorical (a softmax average is no predictive of
    a regression value or of independent labels): by the config's ``problem_type``, a
    one-output classifier (transformers' regression), or floating-point labels."""
    config = getattr(_unwrapped(model), "config", None)
    problem = getattr(config, "problem_type", None)
    if problem in ("regression", "multi_label_classification"):
        why = f"problem_type={problem!r}"
    elif _is_sequence_classifier(model) and getattr(config, "num_labels", 2) == 1:
        why = "num_labels=1 (regression)"
    elif isinstance(labels, torch.Tensor) and labels.is_floating_point():
        why = f"floating-point labels ({labels.dtype}: regression or multi-label)"
    else:
        return
    raise ConfigError(
        f"eval_samples > 0 averages softmax probabilities over the classes, which is not the "
        f"predictive of this head ({why}); use eval_samples=0 (the mean weights)"
    )
