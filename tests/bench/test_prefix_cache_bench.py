"""Smoke test of bench/prefix_cache.py on the tiny local model: every row, sane numbers."""

from __future__ import annotations

import json

from tests.conftest import load_script


def test_prefix_cache_bench_writes_every_row(tmp_path, data_root, tiny_model_dir) -> None:
    module = load_script("bench/prefix_cache.py", "bench_prefix_cache")
    out = tmp_path / "report.json"
    module.main(
        [
            "--model", str(tiny_model_dir),
            "--targets", r".*\.layers\.1\.self_attn\.(q_proj|v_proj)|.*lm_head",
            "--tasks", "openbookqa",
            "--data-root", str(data_root),
            "--batch-size", "2",
            "--max-length", "64",
            "--repeats", "1",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["config"]["frozen_blocks"] == 1
    got = {(r["method"], r["what"]) for r in report["rows"]}
    assert got == {
        ("lora", "train step"),
        ("lora", "predict N=0"),
        ("blob", "train step"),
        ("blob", "predict N=10"),
    }
    for r in report["rows"]:
        assert r["full_s"]["median"] > 0 and r["cached_s"]["median"] > 0
        assert r["speedup"] == r["full_s"]["median"] / r["cached_s"]["median"]
        assert r["tokens"][0] == 2
