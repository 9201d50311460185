"""Smoke test of bench/eval_cost.py on its tiny setting: briefly trained runs of three methods
are evaluated through ``evaluate_on_task`` with each method's own default N, and the report's
counts and ratios are what ran."""

from __future__ import annotations

import json

from blob_lora.methods import get_method
from tests.conftest import load_script


def test_eval_cost_bench_times_each_method_beside_lora(tmp_path, data_root) -> None:
    module = load_script("bench/eval_cost.py", "bench_eval_cost")
    out = tmp_path / "report.json"
    module.main(
        [
            "--setting", "tiny",
            "--methods", "lora", "blob", "swag",
            "--data-root", str(data_root),
            "--n-questions", "4",
            "--batch-size", "4",
            "--warmup", "0",
            "--repeats", "2",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["config"]["setting"] == "tiny" and report["config"]["task"] == "arc_easy"
    assert report["reference"] == "lora" and report["split"] == "eval[:4]"
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["lora", "blob", "swag"]
    # each method's own default N (nothing passed): LoRA one pass, BLoB 10, SWAG 15
    assert {m: r["eval_samples"] for m, r in rows.items()} == {"lora": 0, "blob": 10, "swag": 15}
    for method, r in rows.items():
        assert r["eval_samples"] == get_method(method).samples_by_default
        assert r["metrics_eval_samples"] == r["eval_samples"] and r["n_examples"] == 4
        for column, s in r["seconds"].items():
            assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"]
            assert r["per_question_s"][column] == s["median"] / 4
            lora = rows["lora"]["seconds"][column]["median"]
            assert r["over_reference"][column] == s["median"] / lora
        # the predictive is part of the evaluate call it was timed in
        for a, b in zip(r["times_s"]["pred_wall"], r["times_s"]["eval_wall"], strict=True):
            assert a < b
        # the prefix cache runs the frozen bottom block once per question; every sample runs
        # the adapted top block
        assert r["batches"] == 1 and r["bottom_rows_per_question"] == 1
        assert r["top_rows_per_question"] == max(1, r["eval_samples"])
        assert r["memory"]["peak_bytes"] >= r["memory"]["before_bytes"] > 0
    assert set(rows["lora"]["over_reference"].values()) == {1.0}
    # BLoB folds its 10 samples into one forward per batch; SWAG runs one forward per draw
    assert rows["lora"]["forwards_per_batch"] == 1 and rows["blob"]["forwards_per_batch"] == 1
    assert rows["swag"]["forwards_per_batch"] == 15


def test_eval_cost_bench_compares_batch_orders_in_one_run(tmp_path, data_root) -> None:
    """``--batch-order both``: every method timed in length-sorted and split-ordered batches,
    the padded tokens counted from the top block's inputs."""
    module = load_script("bench/eval_cost.py", "bench_eval_cost")
    out = tmp_path / "report.json"
    module.main(
        [
            "--setting", "tiny",
            "--methods", "lora", "blob",
            "--data-root", str(data_root),
            "--n-questions", "8",
            "--batch-size", "4",
            "--batch-order", "both",
            "--warmup", "0",
            "--repeats", "1",
            "--no-memory",
            "--out", str(out),
        ]
    )  # fmt: skip
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["lora", "lora (split order)", "blob", "blob (split order)"]
    assert {r["batch_order"] for r in rows.values()} == {"length", "split"}
    for method in ("lora", "blob"):
        fast, slow = rows[method], rows[f"{method} (split order)"]
        # the same questions and samples; sorting only removes padding (ARC lengths differ)
        assert fast["top_rows"] == slow["top_rows"]
        assert fast["top_tokens"] < slow["top_tokens"]
        ratio = fast["over_split_order"]
        assert ratio["top_tokens"] == fast["top_tokens"] / slow["top_tokens"]
        wall = fast["seconds"]["pred_wall"]["median"] / slow["seconds"]["pred_wall"]["median"]
        assert ratio["pred_wall"] == wall
        assert "over_split_order" not in slow


def test_eval_cost_bench_gpu_setting_dry_run_in_bf16(tmp_path, data_root) -> None:
    """``--setting gpu --device cpu --tiny-shape``: the GPU setting's code path (a bf16 base
    built on the device, the character tokenizer, the real training and evaluation) on the
    tests' tiny Llama, so that a lent GPU's minutes are not spent finding its bugs."""
    module = load_script("bench/eval_cost.py", "bench_eval_cost")
    out = tmp_path / "report.json"
    module.main(
        [
            "--setting", "gpu", "--device", "cpu", "--tiny-shape",
            "--methods", "lora", "bayesian-lora",
            "--data-root", str(data_root),
            "--n-questions", "4", "--batch-size", "4",
            "--warmup", "0", "--repeats", "1",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["config"]["model"] == "tiny" and report["config"]["dtype"] == "bfloat16"
    assert report["machine"]["device"] == "cpu"
    rows = {r["method"]: r for r in report["rows"]}
    assert {m: r["eval_samples"] for m, r in rows.items()} == {"lora": 0, "bayesian-lora": 4}
    for r in rows.values():
        assert r["metrics_eval_samples"] == r["eval_samples"] and r["n_examples"] == 4
        assert r["top_rows_per_question"] == max(1, r["eval_samples"])
