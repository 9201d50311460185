"""Smoke test of bench/length_chunks.py on its tiny setting: each (method, chunks) loop is the
trainer's own, and the counted tokens show the padding the chunks remove."""

from __future__ import annotations

import json

from tests.conftest import load_script


def test_length_chunks_bench_times_each_loop(tmp_path, data_root) -> None:
    module = load_script("bench/length_chunks.py", "bench_length_chunks")
    out = tmp_path / "report.json"
    module.main(
        [
            "--setting", "tiny",
            "--chunks", "1", "4",
            "--data-root", str(data_root),
            "--n-train", "8",
            "--batch-size", "4",
            "--steps", "2",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["warmup_steps"] == 2 and report["config"]["chunks"] == [1, 4]
    rows = {(r["method"], r["length_chunks"]): r for r in report["rows"]}
    assert list(rows) == [("lora", 1), ("lora", 4), ("blob", 1), ("blob", 4)]
    for (method, chunks), r in rows.items():
        assert r["step_s"]["n"] == 2 and len(r["times_s"]) == 2
        first = rows[(method, 1)]["step_s"]["median"]
        assert r["over_first"] == r["step_s"]["median"] / first
        # one chunk per example: no padding left, fewer positions than the padded batch
        if chunks == 4:
            assert 0 < r["top_tokens_per_step"] < rows[(method, 1)]["top_tokens_per_step"]
    # the same examples in both loops: LoRA and BLoB pad alike
    assert rows[("lora", 1)]["top_tokens_per_step"] == rows[("blob", 1)]["top_tokens_per_step"]
