"""``<method>-mean`` columns of ``blob-lora compare``: a sampling method's runs evaluated once
more with N = 0, for the methods that declare ``mean_column`` (``blob-mean``: BLoB's mean
weights, ``swag-mean``: the SWA model)."""

from __future__ import annotations

import pytest

from blob_lora.comparison.spec import column_for
from blob_lora.utils.errors import ConfigError


@pytest.mark.parametrize("method", ["blob", "swag", "multiswag", "mc-dropout", "bayesian-lora"])
def test_a_sampling_method_has_a_mean_column(method) -> None:
    col = column_for(f"{method}-mean")
    assert col.train_method == method and col.eval_samples == 0
    assert (col.key, col.subdir) == ("evaluations_mean", "eval_mean")


@pytest.mark.parametrize("name", ["lora-mean", "ensemble-mean", "nope-mean"])
def test_no_mean_column_without_samples(name) -> None:
    with pytest.raises(ConfigError, match="swag-mean"):
        column_for(name)
