"""The std-of-A report a BLoB run's summary carries: exact order statistics per layer, and an
overall spread that is ~0 when one value holds everywhere (the KL-set case the README
describes) and large when the elements differ."""

from __future__ import annotations

import torch

from blob_lora.tuners.blob import blob_layers
from blob_lora.tuners.blob.std_report import order_quantiles, std_of_a
from tests.factories import tiny_blob_model


def _set_std(model, values_for) -> None:
    """Give every BLoB layer's std the values ``values_for(n)`` (``square``: rho = sqrt(std))."""
    with torch.no_grad():
        for _, layer in blob_layers(model):
            rho = layer.lora_A_rho["default"]
            rho.copy_(values_for(rho.numel()).sqrt().view_as(rho))


def test_one_value_everywhere_has_no_spread() -> None:
    model = tiny_blob_model(0)
    _set_std(model, lambda n: torch.full((n,), 0.05))
    report = std_of_a(model)
    assert report["q01"] == report["q99"]
    assert abs(report["q01"] - 0.05) < 1e-7  # rho = sqrt(0.05) squared back, in float32
    assert report["spread"] == 0.0
    assert len(report["layers"]) == len(list(blob_layers(model))) > 0
    for row in report["layers"].values():
        assert row["q01"] == row["q50"] == row["q99"] and row["prior_std"] > 0


def test_quantiles_are_the_nearest_rank_elements() -> None:
    # std = a permutation of linspace(0.01, 0.2, n): the k-th smallest is known in closed form
    model = tiny_blob_model(0)
    generator = torch.Generator().manual_seed(0)

    def shuffled(n: int) -> torch.Tensor:
        return torch.linspace(0.01, 0.2, n)[torch.randperm(n, generator=generator)]

    _set_std(model, shuffled)
    report = std_of_a(model)
    for name, layer in blob_layers(model):
        n = layer.lora_A_rho["default"].numel()
        row = report["layers"][name]
        for key, q in (("q01", 0.01), ("q50", 0.5), ("q99", 0.99)):
            expected = torch.linspace(0.01, 0.2, n)[round(q * (n - 1))]
            assert abs(row[key] - expected.item()) < 1e-6, (name, key)
    assert report["spread"] > 1.0  # q99 / q01 - 1 over a 20x range


def test_order_quantiles_handle_one_element_and_pick_data_values() -> None:
    assert order_quantiles(torch.tensor([3.0])) == [3.0, 3.0, 3.0]
    values = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert order_quantiles(values, (0.0, 0.5, 1.0)) == [1.0, 3.0, 5.0]


def test_a_model_without_std_reports_nothing() -> None:
    model = tiny_blob_model(0)
    for _, layer in blob_layers(model):
        layer.make_deterministic("default")  # plain LoRA layers, as outside bayesian_layers
    assert std_of_a(model) == {}


def test_a_std_of_zero_leaves_the_spread_undefined_instead_of_failing_the_run() -> None:
    # the square parameterisation reaches std 0 at rho = 0; the report ends every BLoB run,
    # so a division by that q01 would fail the run after its training
    model = tiny_blob_model(0)
    _set_std(model, lambda n: torch.cat([torch.zeros(n // 10), torch.full((n - n // 10,), 0.05)]))
    report = std_of_a(model)
    assert report["q01"] == 0.0 and report["q99"] > 0 and report["spread"] is None
