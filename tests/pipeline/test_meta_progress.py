"""``meta-evaluate`` stopped part way keeps the held-out tasks it had scored, and the batches
of the task it was scoring: the next evaluation of the same run, contender and samples scores
only the rest and writes what the uninterrupted evaluation writes (but its wall seconds);
scores kept under other settings, or a damaged progress file, are not used. On the tiny model,
2 held-out tasks (``test_meta_baselines``' run).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from blob_lora.cli.main import main
from blob_lora.pipeline import meta_evaluate as meta_evaluate_module
from blob_lora.pipeline import meta_progress
from blob_lora.pipeline.meta_evaluate import META_EVAL_FILE, meta_evaluate
from blob_lora.pipeline.meta_progress import partial_path
from blob_lora.prediction import loop
from blob_lora.prediction.resume import PassCheckpoint
from tests.pipeline.test_meta import timeless, train_args
from tests.pipeline.test_meta_baselines import meta_run, run_copy  # noqa: F401 - fixtures

torch.set_num_threads(1)


class Killed(BaseException):
    """The process dying in the middle of the second task: no ``except`` catches it."""


def result_file(out, baseline):
    return out / (META_EVAL_FILE if baseline is None else f"meta_eval_{baseline}.json")


def counting(monkeypatch, *, die_at: int | None = None) -> list[str]:
    """Record the name of every task ``evaluate_task`` scores; die when it starts the
    ``die_at``-th (1-based)."""
    real = meta_evaluate_module.evaluate_task
    scored: list[str] = []

    def evaluate_task(contender, pool, run, **kwargs):
        if die_at is not None and len(scored) + 1 == die_at:
            raise Killed(f"killed while scoring {pool.name}")
        scored.append(pool.name)
        return real(contender, pool, run, **kwargs)

    monkeypatch.setattr(meta_evaluate_module, "evaluate_task", evaluate_task)
    return scored


def evaluate(run, out, baseline, **kwargs):
    return meta_evaluate(run, out, baseline=baseline, progress=False, **kwargs)


@pytest.mark.parametrize("baseline", [None, "blob-support"])
def test_a_stopped_evaluation_resumes_to_the_uninterrupted_result(
    run_copy,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
    baseline,
):
    """ABMLL and BLoB draw weight noise in every task's fit and predictive: the second task,
    scored alone in a later process (another global RNG state), gives what it gives after the
    first task in one process."""
    run, _ = run_copy
    whole = tmp_path / "whole"
    evaluate(run, whole, baseline)
    held_out = json.loads((run / "tasks.json").read_text())["meta_test"]
    assert len(held_out) == 2

    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        counting(m, die_at=2)
        with pytest.raises(Killed):
            evaluate(run, out, baseline)
    partial = partial_path(result_file(out, baseline))
    assert not result_file(out, baseline).exists()
    kept = json.loads(partial.read_text())
    assert list(kept["tasks"]) == list(kept["seconds"]) == held_out[:1]

    torch.manual_seed(12345)
    capsys.readouterr()
    scored = counting(monkeypatch)
    evaluate(run, out, baseline)
    assert scored == held_out[1:]  # the first task was taken from the progress file
    assert "(1 of 2 held-out tasks scored)" in capsys.readouterr().err
    got, want = (json.loads(result_file(f, baseline).read_text()) for f in (out, whole))
    assert timeless(got) == timeless(want)
    # the cost of every sitting: the first task's seconds are the stopped evaluation's
    assert got["task_seconds"][held_out[0]] == kept["seconds"][held_out[0]]
    assert not partial.exists()


def test_scores_kept_under_other_samples_are_not_used(run_copy, tmp_path, monkeypatch, caplog):  # noqa: F811
    run, _ = run_copy
    out = tmp_path / "eval"
    with monkeypatch.context() as m:
        counting(m, die_at=2)
        with pytest.raises(Killed):
            evaluate(run, out, None, eval_samples=2)
    scored = counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        got = evaluate(run, out, None, eval_samples=3)
    assert len(scored) == 2 and "under other settings" in caplog.text
    monkeypatch.undo()
    fresh = evaluate(run, tmp_path / "fresh", None, eval_samples=3)
    assert timeless(got) == timeless(fresh) and got["eval_samples"] == 3


def stop_after_first_task(run, out, baseline, monkeypatch) -> None:
    with monkeypatch.context() as m:
        counting(m, die_at=2)
        with pytest.raises(Killed):
            evaluate(run, out, baseline)


def test_a_baseline_keeps_its_progress_when_the_global_parameters_change(
    run_copy,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
):
    """A baseline never reads ABMLL's weights: a run restored without them (a new machine, see
    ``paper/abmll_tables.py``) resumes the baseline's progress; ABMLL's own progress, which
    rests on those weights, is not used once they change."""
    run, _ = run_copy
    out = tmp_path / "eval"
    stop_after_first_task(run, out, "zero-shot", monkeypatch)
    stop_after_first_task(run, out, None, monkeypatch)
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights)  # other global parameters

    scored = counting(monkeypatch)
    evaluate(run, out, "zero-shot")
    assert len(scored) == 1  # the first task came from the progress file
    with caplog.at_level(logging.WARNING):
        evaluate(run, out, None)
    assert len(scored) == 1 + 2 and "under other settings" in caplog.text
    weights.unlink()  # published without its weights and restored: a baseline still runs
    evaluate(run, tmp_path / "restored", "zero-shot")
    assert len(scored) == 1 + 2 + 2


@pytest.mark.parametrize(
    "damage", ["not json", '{"key": 1}', '{"tasks": [1]}', '{"tasks": {"t": {}}, "seconds": {}}']
)
def test_a_damaged_progress_file_is_ignored_with_a_warning(
    run_copy,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
    damage,
):
    run, _ = run_copy
    out = tmp_path / "eval"
    partial = partial_path(out / "meta_eval_zero-shot.json")
    partial.parent.mkdir(parents=True)
    partial.write_text(damage)
    scored = counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        evaluate(run, out, "zero-shot")
    assert len(scored) == 2
    assert "scoring every held-out task again" in caplog.text
    assert not partial.exists() and (out / "meta_eval_zero-shot.json").is_file()


def test_the_cli_resumes_too(run_copy, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The command the tables run: stopped, then the same command line again."""
    run, _ = run_copy
    argv = ["meta-evaluate", "--run", str(run), "--out", str(tmp_path), "--no-progress",
            "--baseline", "lora-support"]  # fmt: skip
    with monkeypatch.context() as m:
        counting(m, die_at=2)
        with pytest.raises(Killed):
            main(argv)
    scored = counting(monkeypatch)
    assert main(argv) == 0
    assert len(scored) == 1
    assert "resuming from" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_batches(meta_run):  # noqa: F811
    """The same tiny collection meta-trained with 2 questions a batch: each held-out task's 7
    scored questions take 4 batches, so a pass can stop inside a task."""
    root, model, tasks, _ = meta_run
    out = root / "small-batches"
    assert main([*train_args(tasks, model, out), "--batch-size", "2"]) == 0
    return out


def test_a_task_stopped_inside_its_pass_goes_on_from_the_batch_after_the_last_kept(
    small_batches, tmp_path, monkeypatch
):
    """ABMLL's weight samples: killed after the second batch of the second task, the next
    evaluation adapts that task again, restores the random state and scores only its last two
    batches, to the uninterrupted result; the task's seconds include the stopped sitting's."""
    run = small_batches
    monkeypatch.setattr(meta_progress, "PASS_EVERY_SECONDS", 0.0)  # a write after every batch
    whole = evaluate(run, tmp_path / "whole", None)
    out = tmp_path / "stopped"
    real_save = PassCheckpoint.save
    saves: list[float] = []

    def save(self, batches, parts, samples):
        real_save(self, batches, parts, samples)
        saves.append(torch.load(self.path, weights_only=True)["seconds"])
        if len(saves) == 6:  # 4 batches of the first task, 2 of the second
            raise Killed("killed in the second task's pass")

    with monkeypatch.context() as m:
        m.setattr(PassCheckpoint, "save", save)
        with pytest.raises(Killed):
            evaluate(run, out, None)
    kept = list(out.glob("meta_eval.partial.task-*.pt"))
    assert len(kept) == 1  # the first task's pass file went once its metrics were kept

    batches = []
    real_batch = loop.predict_batch

    def predict_batch(*args, **kwargs):
        batches.append(1)
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(loop, "predict_batch", predict_batch)
    torch.manual_seed(12345)
    got = evaluate(run, out, None)
    assert len(batches) == 2
    assert timeless(got) == timeless(whole)
    second = list(got["tasks"])[1]
    assert got["task_seconds"][second] >= saves[-1] > 0
    assert sorted(p.name for p in out.iterdir()) == ["meta_eval.json"]
