"""A prediction pass holds the model still (``Method.frozen``): Bayesian-LoRA pins its
factorisations for the whole pass, with the same predictive as factorising in every batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from blob_lora.methods import get_method
from blob_lora.prediction import predict_dataset
from blob_lora.tasks import get_task, task_inputs
from blob_lora.tuners.bayesian_lora import bayesian_lora_layers
from blob_lora.tuners.bayesian_lora.config import AUTHORS_LAYERS
from tests.factories import tiny_bayesian_lora_model


def posteriors(model):
    for _, layer in bayesian_lora_layers(model):
        yield from layer.lora_inducing_A.values()
        yield from layer.lora_inducing_B.values()


def test_bayesian_lora_pass_pins_its_factors_and_predicts_as_without(data_root, tokenizer):
    inputs = task_inputs(get_task("winogrande_s", data_root), "validation[:7]", tokenizer, 96)
    model = tiny_bayesian_lora_model(0, layers=AUTHORS_LAYERS).eval()
    method = get_method("bayesian-lora")
    pinned_in_batches: list[bool] = []

    class Watched(type(method)):
        def predict_samples(self, model, batch, option_ids, n_samples, fold=None):
            pinned_in_batches.append(all(p._pinned is not None for p in posteriors(model)))
            return super().predict_samples(model, batch, option_ids, n_samples, fold=fold)

    class Unpinned(type(method)):
        @contextmanager
        def frozen(self, model) -> Iterator[None]:
            yield

    def run(m):
        torch.manual_seed(0)
        return predict_dataset(
            model, m, inputs.dataset, inputs.collator, inputs.option_ids, 4, batch_size=3
        )

    pinned, unpinned = run(Watched()), run(Unpinned())
    assert pinned_in_batches == [True, True, True]  # 7 questions in batches of 3
    assert len(list(posteriors(model))) == 6  # q_proj of both blocks and the head, A and B
    assert all(p._pinned is None for p in posteriors(model))  # released after the pass
    assert torch.equal(pinned.probs, unpinned.probs)
    assert torch.equal(pinned.epistemic, unpinned.epistemic)
    assert pinned.epistemic.abs().sum() > 0  # the samples differ: the draws were compared
