"""The ablation table's std column: mean and 10/90 % quantiles over every element of every
Bayesian layer, read through the adapter's std parametrisation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ablate import _final_std


def test_final_std_pools_every_layer_through_the_parametrisation(tmp_path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    rho_a = torch.full((4, 8), 0.1)  # square: std 0.01
    rho_b = torch.full((4, 8), 0.3)  # std 0.09
    save_file(
        {
            "m.q.lora_A_rho": rho_a,
            "m.v.lora_A_rho": rho_b,
            "m.q.lora_A.weight": rho_b.clone(),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "blob_config.json").write_text(json.dumps({"std_param": "square"}))
    s = _final_std(tmp_path)
    assert s["mean"] == pytest.approx(0.05)
    assert s["q10"] == pytest.approx(0.01) and s["q90"] == pytest.approx(0.09)
    assert _final_std(tmp_path / "missing") is None
