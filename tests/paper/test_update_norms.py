"""paper/update_norms.py: the norm of each layer's LoRA update ``scaling * B A`` from a saved
adapter, and which layers of a Bayesian-LoRA adapter are Bayesian."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blob_lora.tuners.bayesian_lora.config import AUTHORS_LAYERS
from tests.conftest import load_script
from tests.factories import tiny_bayesian_lora_model


def test_norms_and_bayesian_layers_of_a_saved_bayesian_lora_adapter(tmp_path: Path) -> None:
    norms = load_script("paper/update_norms.py", "update_norms")
    model = tiny_bayesian_lora_model(0, layers=AUTHORS_LAYERS)  # q_proj, lm_head Bayesian
    with torch.no_grad():  # a trained plain layer: B is no longer zero
        for name, p in model.named_parameters():
            if "v_proj.lora_B" in name:
                p.normal_()
    run = tmp_path / "run"
    model.save_pretrained(run / "adapter")
    report_path = tmp_path / "norms.json"
    assert norms.main([str(run), "--json", str(report_path)]) == 0
    (report,) = json.loads(report_path.read_text())
    assert report["scaling"] == 2.0  # lora_alpha 8 / r 4
    layers = report["layers"]
    assert {n for n, row in layers.items() if row["bayesian"]} == {
        "lm_head",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    }
    assert {n for n, row in layers.items() if not row["bayesian"]} == {
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    }
    # (out, r, in): the head maps hidden 32 to the vocabulary's 128, rank 4
    assert layers["lm_head"]["shape"] == [128, 4, 32]
    assert layers["model.layers.0.self_attn.q_proj"]["shape"] == [32, 4, 32]
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for name, row in layers.items():
        a = saved[f"base_model.model.{name}.lora_A.weight"].double()
        b = saved[f"base_model.model.{name}.lora_B.weight"].double()
        dense = float(torch.linalg.matrix_norm(2.0 * b @ a))  # the update, formed
        assert dense > 0 and row["norm"] == pytest.approx(dense, rel=1e-9)
    bayes = [row["norm"] for row in layers.values() if row["bayesian"]]
    plain = [row["norm"] for row in layers.values() if not row["bayesian"]]
    assert report["summary"] == {
        "bayesian": [min(bayes), max(bayes)],
        "plain": [min(plain), max(plain)],
        "plain_over_bayesian": [min(plain) / max(bayes), max(plain) / min(bayes)],
    }
    assert norms.summary({"layers": {"x": {"norm": 1.0, "bayesian": False}}}) is None


def test_initial_norms_are_those_of_freshly_drawn_posterior_means(tmp_path: Path) -> None:
    """``--initial-draws``: each Bayesian layer rebuilt from its saved shape and settings, its
    initial posterior mean's update norm; one draw, recomputed here by hand."""
    from blob_lora.tuners.bayesian_lora.config import BayesianLoraConfig
    from blob_lora.tuners.bayesian_lora.inducing import InducingWeight

    norms = load_script("paper/update_norms.py", "update_norms")
    model = tiny_bayesian_lora_model(0, layers=AUTHORS_LAYERS)
    run = tmp_path / "run"
    model.save_pretrained(run / "adapter")
    report_path = tmp_path / "norms.json"
    assert norms.main([str(run), "--json", str(report_path), "--initial-draws", "1"]) == 0
    (report,) = json.loads(report_path.read_text())
    config = BayesianLoraConfig.load(run / "adapter")
    expected = []
    torch.manual_seed(0)
    with torch.no_grad():
        for row in report["layers"].values():
            if row["bayesian"]:
                d_out, r, d_in = row["shape"]
                a = InducingWeight(r, d_in, config).mean_weight()
                b = InducingWeight(d_out, r, config).mean_weight()
                expected.append(norms.update_norm(a, b, report["scaling"]))
    assert len(expected) == 3 and min(expected) > 0
    assert report["summary"]["initial_bayesian"] == [min(expected), max(expected)]


def test_scaling_follows_rslora() -> None:
    norms = load_script("paper/update_norms.py", "update_norms")
    assert norms.lora_scaling({"r": 4, "lora_alpha": 8}) == 2.0
    assert norms.lora_scaling({"r": 4, "lora_alpha": 8, "use_rslora": True}) == 4.0
    assert math.isclose(
        norms.update_norm(torch.eye(2, 3), torch.ones(5, 2), 3.0), 3.0 * math.sqrt(10)
    )


def test_a_folder_without_an_adapter_is_named(tmp_path: Path) -> None:
    norms = load_script("paper/update_norms.py", "update_norms")
    with pytest.raises(SystemExit, match="no readable adapter folder"):
        norms.main([str(tmp_path)])
