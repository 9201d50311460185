"""bench/compare_workers.py: the children it starts are valid runs of the two benchmarks it
reads, and its throughputs and gains are the arithmetic of the children's own numbers."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/compare_workers.py", "bench_compare_workers")


def test_children_are_valid_runs_of_the_benchmarks_they_name(bench, tmp_path) -> None:
    args = bench.parse_args(["--setting", "tiny", "--threads", "2", "--data-root", "/d"])
    assert args.workers == 2
    for kind, script, name in (
        ("train", "bench/train_full_step.py", "bench_train_full_step"),
        ("eval", "bench/eval_cost.py", "bench_eval_cost"),
    ):
        cmd = bench.workload_command(kind, args, tmp_path / "x.json")
        assert cmd[1].endswith(script)
        child = load_script(script, name).parse_args(cmd[2:])
        assert (child.setting, child.task, child.scoring) == ("tiny", "arc_challenge", "cloze")
        assert str(child.out) == str(tmp_path / "x.json") and child.data_root == "/d"
    child = load_script("bench/eval_cost.py", "bench_eval_cost").parse_args(
        bench.workload_command("eval", args, tmp_path / "x.json")[2:]
    )
    assert child.methods == ["lora", "blob"] and child.n_questions == 48 and not child.memory


def test_one_worker_is_refused(bench) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--threads", "1"])


def test_throughput_and_gain_are_the_childrens_numbers(bench, monkeypatch, tmp_path) -> None:
    """Alone: 1 step per 0.5 s (LoRA), 0.8 s (BLoB); together each child is slower (0.8 and
    1.0 s; 1.2 and 1.6 s), yet the pair does 1/0.8 + 1/1.0 = 2.25 LoRA steps a second
    against 2: gain 1.125."""

    def train_result(lora, blob):
        return {"rows": [{"step_s": {"lora": {"median": lora}, "blob": {"median": blob}}}]}

    def fake_children(kind, args, n, threads, tmp):
        if n == 1:
            assert threads == 2
            return [train_result(0.5, 0.8)], [100.0]
        assert (n, threads) == (2, 1)
        return [train_result(0.8, 1.2), train_result(1.0, 1.6)], [150.0, 160.0]

    monkeypatch.setattr(bench, "run_children", fake_children)
    args = bench.parse_args(["--threads", "2"])
    alone, together = bench.measure("train", args, tmp_path)
    assert alone["throughput"] == pytest.approx({"lora": 2.0, "blob": 1.25})
    assert together["throughput"] == pytest.approx({"lora": 2.25, "blob": 1 / 1.2 + 1 / 1.6})
    assert together["gain"]["lora"] == pytest.approx(1.125)
    assert together["gain"]["blob"] == pytest.approx((1 / 1.2 + 1 / 1.6) / 1.25)
    assert together["job_gain"] == pytest.approx(2 * 100.0 / 160.0)
    assert "| train    | 2 x 1" in bench.render([alone, together])


def test_eval_reads_seconds_per_question(bench) -> None:
    result = {
        "rows": [
            {"method": "lora", "per_question_s": {"pred_wall": 0.05}},
            {"method": "blob", "per_question_s": {"pred_wall": 0.3}},
        ]
    }
    assert bench.per_unit_seconds("eval", result) == {"lora": 0.05, "blob": 0.3}
