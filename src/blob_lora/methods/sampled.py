"""The prediction hooks shared by the LoRA methods whose tuner layers draw weights (BLoB,
Bayesian-LoRA, ABMLL): N sampled forwards averaged, N = 0 the mean weights.

Each of those tuners carries its settings on the PEFT model as ``{adapter: settings}`` (the
attribute its ``OptionsPeftMixin`` names) and offers a ``sampling(model, enabled, mode)`` block
and an iterator over its layers; given those, recognising a model, its default N, the sampled
and mean passes and the random modules are the same code, written here once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

from torch import nn

from blob_lora.methods.base import unwrapped
from blob_lora.methods.lora import LoraMethod


class SampledLoraMethod(LoraMethod):
    """A ``LoraMethod`` whose layers sample weights by default (training) and whose predictive
    averages N independent weight samples, one coherent sample per sequence."""

    mean_column = True
    iid_samples = True
    #: the PEFT model's ``{adapter: settings}`` attribute (the tuner's ``OPTIONS_ATTR``)
    options_attr: ClassVar[str]

    def weight_sampling(
        self, model: nn.Module, enabled: bool, mode: str | None
    ) -> AbstractContextManager[Any]:
        """The tuner's ``sampling`` block: its layers draw weights (``enabled``) or use the
        means; ``mode`` says how draws are shared within a forward."""
        raise NotImplementedError

    def sampling_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """The tuner's layers that draw weights, with their names."""
        raise NotImplementedError

    def predictive_noise(self, model: nn.Module) -> str:
        """The sample mode of the N predictive samples: independent draws per sequence, since
        several samples of one example share a folded batch."""
        return "independent"

    def options_of(self, model: nn.Module) -> dict[str, Any]:
        """The settings the model carries per adapter (``{}`` for a model of another method)."""
        return getattr(model, self.options_attr, None) or getattr(
            unwrapped(model), self.options_attr, {}
        )

    def owns(self, model: nn.Module) -> bool:
        return bool(self.options_of(model))

    def eval_samples(self, model: nn.Module, requested: int | None) -> int:
        if requested is not None:
            return requested
        options = self.options_of(model)
        return options["default"].eval_samples if options else self.samples_by_default

    @contextmanager
    def sampling_mode(self, model: nn.Module, n_samples: int) -> Iterator[None]:
        with self.weight_sampling(model, n_samples > 0, self.predictive_noise(model)):
            yield

    @contextmanager
    def mean_mode(self, model: nn.Module) -> Iterator[None]:
        # the layers sample by default (training): the N = 0 pass must switch that off, or it
        # would be one random sample
        with self.weight_sampling(model, False, None):
            yield

    def stochastic_modules(self, model: nn.Module) -> list[str]:
        return [name for name, _ in self.sampling_layers(model)]
