"""``tuners.peft_adapter.layer_attributes``: the switch every tuner's sampling and noise
contexts use."""

from __future__ import annotations

import pytest
from torch import nn

from blob_lora.tuners.peft_adapter import layer_attributes


def _layers() -> list[nn.Module]:
    layers = [nn.Identity(), nn.Identity()]
    for i, layer in enumerate(layers):
        layer.sampling = False
        layer.mode = f"own-{i}"
    return layers


def test_each_layer_gets_its_own_values_back() -> None:
    layers = _layers()
    with layer_attributes(layers, sampling=True, mode="shared"):
        assert [(la.sampling, la.mode) for la in layers] == [(True, "shared"), (True, "shared")]
    assert [(la.sampling, la.mode) for la in layers] == [(False, "own-0"), (False, "own-1")]


def test_attributes_not_named_are_left_alone_and_nesting_unwinds() -> None:
    layers = _layers()
    with layer_attributes(layers, sampling=True):
        assert [la.mode for la in layers] == ["own-0", "own-1"]
        with layer_attributes(layers, sampling=False, mode="independent"):
            assert layers[1].mode == "independent"
        assert [(la.sampling, la.mode) for la in layers] == [(True, "own-0"), (True, "own-1")]
    assert [la.sampling for la in layers] == [False, False]


def test_an_error_inside_the_block_still_restores() -> None:
    layers = _layers()
    with pytest.raises(RuntimeError, match="inside"), layer_attributes(layers, mode="token"):
        raise RuntimeError("inside")
    assert [la.mode for la in layers] == ["own-0", "own-1"]
