"""Config files read ``1e-4`` as the number users mean (PyYAML alone reads YAML 1.1: a string)."""

from __future__ import annotations

from blob_lora.cli.options import merge_config, read_config_file
from blob_lora.utils.yaml_file import load_yaml


def test_exponent_floats_without_a_dot_are_numbers():
    data = load_yaml("a: 1e-4\nb: -2E+3\nc: .5e1\nd: 10\ne: 1.5\nf: '1e-4'\ng: 1e\nh: e5\ni: 0x10")
    assert data == {
        "a": 1e-4, "b": -2000.0, "c": 5.0, "d": 10, "e": 1.5,
        "f": "1e-4", "g": "1e", "h": "e5", "i": 16,
    }  # fmt: skip
    assert type(data["d"]) is int


def test_a_train_config_with_lr_1e_4(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nkl-lr: 5e-3\nmax_steps: 20\n")
    cfg = merge_config(read_config_file(path), {})
    assert (cfg.loop.lr, cfg.kl.kl_lr, cfg.loop.max_steps) == (1e-4, 5e-3, 20)
