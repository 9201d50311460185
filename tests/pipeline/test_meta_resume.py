"""``meta-train``'s checkpoints on the tiny model: a run that dies after a checkpoint (or in
its final write) and is resumed ends on the uninterrupted run's adapter, log and summary, bit
for bit; other settings refuse to resume and touch nothing; a damaged newest checkpoint is
skipped with a warning; ``--overwrite`` loses nothing until the new run has finished; and
``meta-evaluate`` refuses a run whose training has not finished.

The death is in-process: the checkpoint writer (or the final write) raises a ``BaseException``
that nothing in the command catches, right after the write, as a kill would land. The
SIGKILL of a real process is ``tests/faults/test_meta_kill_and_resume.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from blob_lora.cli.main import main
from blob_lora.pipeline import meta_loop, meta_multitask
from blob_lora.pipeline import meta_train as meta_train_module
from blob_lora.pipeline.meta_evaluate import meta_evaluate
from blob_lora.training import checkpoint as ckpt
from blob_lora.utils.errors import ConfigError
from tests.factories import tiny_model_folder, tiny_task_collection
from tests.pipeline.test_meta import train_args
from tests.pipeline.test_meta_baselines import contender_of

torch.set_num_threads(1)

STEPS = 6


class Killed(BaseException):
    """The process dying: no ``except`` of the command catches it."""


def args(tasks, model, out, *extra: str) -> list[str]:
    """A 6-step run with a checkpoint after every step; LoRA dropout draws from the global RNG,
    so a resume that did not restore it would end elsewhere."""
    base = train_args(tasks, model, out, "--lora-dropout", "0.2", "--checkpoint-every", "1")
    base[base.index("--meta-steps") + 1] = str(STEPS)
    return [*base, *extra]


def die_after_checkpoint(monkeypatch, step: int) -> None:
    real = ckpt.save_checkpoint

    def save(root, at, *rest, **kwargs):
        path = real(root, at, *rest, **kwargs)
        if at == step:
            raise Killed(f"killed after checkpoint {at}")
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save)


def killed_run(monkeypatch, tasks, model, out, step: int, *extra: str) -> None:
    """``out`` as a run killed right after its checkpoint of ``step`` leaves it."""
    with monkeypatch.context() as m:
        die_after_checkpoint(m, step)
        with pytest.raises(Killed):
            main(args(tasks, model, out, *extra))
    torch.manual_seed(12345)  # the next run in this process starts from another RNG state


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tasks_without_time(run: Path) -> dict[str, object]:
    """``tasks.json`` but its wall seconds, the one thing no two runs share."""
    summary = json.loads((run / "tasks.json").read_text())
    assert summary.pop("train_seconds") > 0
    return summary


def results(run: Path) -> dict[str, object]:
    """What a finished run is: its adapter tensors, its log and summary (text), its files."""
    return {
        "adapter": load_file(run / "adapter" / "adapter_model.safetensors"),
        "log": (run / "meta_train_log.jsonl").read_text(),
        "tasks": tasks_without_time(run),
        "config": (run / "meta_config.json").read_text(),
        "abmll": (run / "adapter" / "abmll_config.json").read_text(),
        "files": sorted(p.name for p in run.iterdir()),
    }


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = results(run), results(reference)
    assert got["adapter"].keys() == want["adapter"].keys()
    for name, value in want["adapter"].items():
        assert torch.equal(got["adapter"][name], value), name
    for key in ("log", "tasks", "config", "abmll", "files"):
        assert got[key] == want[key], key


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, the tasks and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("meta-resume")
    model = tiny_model_folder(root / "model")
    tasks = tiny_task_collection(root / "tasks", n_tasks=4, n_questions=10)
    reference = root / "reference"
    assert main(args(tasks, model, reference)) == 0
    return tasks, model, reference


def test_the_reference_run_is_finished_and_keeps_no_checkpoint(setup):
    _, _, reference = setup
    assert results(reference)["files"] == [
        "adapter", "meta_config.json", "meta_train_log.jsonl", "tasks.json",
    ]  # fmt: skip
    log = [json.loads(x) for x in (reference / "meta_train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("killed_at", [1, 4])
def test_a_killed_run_resumes_to_the_uninterrupted_run_bit_for_bit(
    setup, tmp_path, monkeypatch, capsys, killed_at
):
    tasks, model, reference = setup
    run = tmp_path / "run"
    killed_run(monkeypatch, tasks, model, run, killed_at)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]
    saved = ckpt.latest_checkpoint(run / "checkpoints")
    assert saved.name == f"step-{killed_at:08d}"
    state = ckpt.load_checkpoint(saved)["state"]
    assert [row["step"] for row in state["log"]] == list(range(1, killed_at + 1))
    assert state["settings"]["lr"] == 1e-4 and state["settings"]["abmll_inner_steps"] == 2

    # meta-evaluate refuses the unfinished run; the same command without --resume too
    with pytest.raises(ConfigError, match="its meta-training has not finished"):
        meta_evaluate(run)
    capsys.readouterr()
    assert main(args(tasks, model, run)) == 2
    assert "holds an unfinished meta-train run; pass --resume" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(run / "checkpoints") == saved

    # --resume (checkpoint frequency is no setting: it may change)
    assert main(args(tasks, model, run, "--resume", "--checkpoint-every", "3")) == 0
    assert f"resuming from {saved} (step {killed_at} of {STEPS})" in capsys.readouterr().err
    assert_same_run(run, reference)


def test_the_time_of_every_sitting_is_counted(setup, tmp_path, monkeypatch):
    """``train_seconds`` is the run's cost: the killed sitting's steps (to its checkpoint) plus
    the resumed one's, not the last sitting's alone. A fake clock gives each sitting's ticks
    their own size, so the sum says which sittings were counted."""
    tasks, model, _ = setup
    run = tmp_path / "run"
    clock = {"now": 0.0, "tick": 1000.0}

    def perf_counter() -> float:
        clock["now"] += clock["tick"]
        return clock["now"]

    monkeypatch.setattr(meta_loop, "time", SimpleNamespace(perf_counter=perf_counter))
    killed_run(monkeypatch, tasks, model, run, 4)
    first = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints"))["state"]["seconds"]
    assert first >= 1000.0  # the first sitting's steps, in its own large ticks
    clock["tick"] = 0.5
    assert main(args(tasks, model, run, "--resume")) == 0
    total = json.loads((run / "tasks.json").read_text())["train_seconds"]
    # the first sitting, plus a few of the second's small ticks (a second sitting counted
    # alone would be under 100, and the first counted twice would add 1000s)
    assert first < total < first + 100.0


def test_the_rng_restore_is_what_makes_the_resume_exact(setup, tmp_path, monkeypatch):
    """Control: LoRA dropout draws from the global RNG, so without the checkpoint's RNG states
    the resumed run would end elsewhere (the test above would catch a missing restore)."""
    tasks, model, reference = setup
    run = tmp_path / "run"
    killed_run(monkeypatch, tasks, model, run, 3)
    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)
    assert main(args(tasks, model, run, "--resume")) == 0
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    want = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(got[k], want[k]) for k in want)


def test_a_kill_in_the_final_write_leaves_no_finished_run_and_resume_finishes_it(
    setup, tmp_path, monkeypatch
):
    tasks, model, reference = setup
    run = tmp_path / "run"
    real = meta_train_module.atomic_write_json

    def write(path, obj, *rest, **kwargs):
        if Path(path).name == "tasks.json":
            raise Killed("killed before tasks.json")
        return real(path, obj, *rest, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(meta_train_module, "atomic_write_json", write)
        with pytest.raises(Killed):
            main(args(tasks, model, run))
    # the adapter and the log are written, the mark of a finished run is not
    assert (run / "adapter" / "abmll_config.json").is_file() and (run / "meta_config.json").exists()
    assert not (run / "tasks.json").exists()
    with pytest.raises(ConfigError, match="its meta-training has not finished"):
        meta_evaluate(run)
    assert ckpt.latest_checkpoint(run / "checkpoints").name == f"step-{STEPS:08d}"
    assert main(args(tasks, model, run, "--resume")) == 0  # no step left: the final write
    assert_same_run(run, reference)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("--lr", "0.001"), "--lr (0.0001 -> 0.001)"),
        (("--abmll-beta", "0.5"), "--abmll-beta ("),
        (("--seed", "2"), "--seed (1 -> 2)"),
    ],
)
def test_other_settings_refuse_to_resume_and_touch_nothing(
    setup, tmp_path, monkeypatch, capsys, change, named
):
    tasks, model, _ = setup
    run = tmp_path / "run"
    killed_run(monkeypatch, tasks, model, run, 2)
    before = snapshot(run)
    capsys.readouterr()
    argv = args(tasks, model, run, "--resume")
    option, value = change
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "settings differ from its checkpoint step-00000002" in err
    assert named in err and "Traceback" not in err
    assert snapshot(run) == before


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(
    setup, tmp_path, monkeypatch, caplog
):
    tasks, model, reference = setup
    run = tmp_path / "run"
    killed_run(monkeypatch, tasks, model, run, 4)
    newest = run / "checkpoints" / "step-00000004"
    data = bytearray((newest / "trainable.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "trainable.safetensors").write_bytes(bytes(data))
    assert main(args(tasks, model, run, "--resume")) == 0
    assert "skipping damaged checkpoint" in caplog.text and "step-00000004" in caplog.text
    assert_same_run(run, reference)


def test_no_intact_checkpoint_is_a_clear_error_and_nothing_is_deleted(
    setup, tmp_path, monkeypatch, capsys
):
    tasks, model, _ = setup
    run = tmp_path / "run"
    killed_run(monkeypatch, tasks, model, run, 3)
    for folder in (run / "checkpoints").glob("step-*"):
        (folder / "manifest.json").unlink()
    before = snapshot(run)
    capsys.readouterr()
    assert main(args(tasks, model, run, "--resume")) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint found" in err and "Traceback" not in err
    assert snapshot(run) == before


def test_resume_of_a_finished_run_has_nothing_to_do(setup, tmp_path, capsys):
    tasks, model, reference = setup
    run = shutil.copytree(reference, tmp_path / "run")
    before = snapshot(run)
    assert main(args(tasks, model, run, "--resume")) == 0
    assert "is finished: nothing to resume" in capsys.readouterr().err
    assert snapshot(run) == before
    assert main(args(tasks, model, run, "--resume", "--lr", "0.001")) == 2
    err = capsys.readouterr().err
    assert "holds a finished run of other settings: --lr (0.0001 -> 0.001)" in err
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "bad",
    [
        ("--tasks", "missing"),  # no such collection
        ("--k-shot", "10"),  # the tasks are too small: found once they are read
        ("--model", "missing-model"),  # the model does not load
        ("--lora-r", "0"),  # a bad setting
    ],
)
def test_overwrite_with_bad_input_keeps_the_old_run(setup, tmp_path, capsys, bad):
    tasks, model, reference = setup
    run = shutil.copytree(reference, tmp_path / "run")
    (run / "meta_eval.json").write_text("{}")  # the old run's evaluation
    before = snapshot(run)
    argv = args(tasks, model, run, "--overwrite")
    option, value = bad
    argv[argv.index(option) + 1] = str(tmp_path / value) if "missing" in value else value
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert snapshot(run) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_has_finished(setup, tmp_path, monkeypatch):
    tasks, model, reference = setup
    run = shutil.copytree(reference, tmp_path / "run")
    (run / "meta_eval.json").write_text("{}")
    old = snapshot(run)
    # the new run dies part way: the old one is whole and still evaluable
    killed_run(monkeypatch, tasks, model, run, 2, "--overwrite", "--lr", "0.001")
    assert {k: v for k, v in snapshot(run).items() if not k.startswith("checkpoints")} == old
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step-00000002"
    from blob_lora.pipeline.meta_evaluate import check_run

    check_run(run)  # the old, finished run
    # the new run resumed to its end replaces the old one: its files, no stale evaluation
    fresh = tmp_path / "fresh"
    assert main(args(tasks, model, fresh, "--lr", "0.001")) == 0
    assert main(args(tasks, model, run, "--overwrite", "--resume", "--lr", "0.001")) == 0
    assert_same_run(run, fresh)


def test_overwrite_of_an_unfinished_run_keeps_its_checkpoints_until_the_end(
    setup, tmp_path, monkeypatch
):
    tasks, model, reference = setup
    run = tmp_path / "run"
    killed_run(monkeypatch, tasks, model, run, 3)
    old = snapshot(run / "checkpoints")
    # a new run over it dies at its first checkpoint: the old checkpoints are set aside
    killed_run(monkeypatch, tasks, model, run, 1, "--overwrite", "--lr", "0.001")
    assert snapshot(run / "checkpoints-replaced") == old
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step-00000001"
    # started over again, it finishes: nothing of either earlier run is left
    assert main(args(tasks, model, run, "--overwrite")) == 0
    assert_same_run(run, reference)


def test_a_folder_of_something_else_is_never_replaced(setup, tmp_path, capsys):
    tasks, model, _ = setup
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",), ("--resume",)):
        assert main(args(tasks, model, other, *extra)) == 2
        assert "holds no meta-train run" in capsys.readouterr().err
    assert snapshot(other) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_a_train_run_folder_is_never_replaced_though_it_has_checkpoints(setup, tmp_path, capsys):
    tasks, model, _ = setup
    run = tmp_path / "trainrun"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "checkpoints" / "step-00000010" / "state.pt").write_bytes(b"train state")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"train adapter")
    (run / "run_config.json").write_text("{}")  # what blob-lora train writes
    before = snapshot(run)
    for extra in ((), ("--overwrite",), ("--resume",)):
        assert main(args(tasks, model, run, *extra)) == 2
        assert "holds a 'blob-lora train' run, no meta-train run" in capsys.readouterr().err
    assert snapshot(run) == before


def test_bad_checkpoint_every_is_refused_naming_the_option(setup, tmp_path, capsys):
    tasks, model, _ = setup
    argv = args(tasks, model, tmp_path / "run")
    argv[argv.index("--checkpoint-every") + 1] = "-1"
    assert main(argv) == 2
    assert "--checkpoint-every must be an integer >= 0 (0: none), got -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_no_checkpoint_while_training_with_zero_gives_the_same_run(setup, tmp_path, monkeypatch):
    tasks, model, reference = setup
    written: list[int] = []
    real = ckpt.save_checkpoint

    def save(root, at, *rest, **kwargs):
        written.append(at)
        return real(root, at, *rest, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    run = tmp_path / "run"
    argv = args(tasks, model, run)
    argv[argv.index("--checkpoint-every") + 1] = "0"
    assert main(argv) == 0
    assert written == [STEPS]  # only the final one, which the final write is redone from
    assert_same_run(run, reference)


def test_multitask_lora_training_resumes_from_its_checkpoints(setup, tmp_path, monkeypatch):
    """The baseline's training (the same outer loop) stopped part way continues from its
    checkpoint, by itself, to the weights of an uninterrupted training."""
    _, model, reference = setup
    monkeypatch.setattr(meta_multitask, "CHECKPOINT_EVERY", 1)
    whole = shutil.copytree(reference, tmp_path / "whole")
    contender_of("multitask-lora", whole, model)
    run = shutil.copytree(reference, tmp_path / "run")
    with monkeypatch.context() as m:
        die_after_checkpoint(m, 2)
        with pytest.raises(Killed):
            contender_of("multitask-lora", run, model)
    kept = run / meta_multitask.MULTITASK_DIR
    assert not (kept / "trained_under.json").exists()
    assert ckpt.latest_checkpoint(kept / "checkpoints").name == "step-00000002"
    torch.manual_seed(12345)
    contender_of("multitask-lora", run, model)
    assert sorted(p.name for p in kept.iterdir()) == [
        "adapter", "train_log.jsonl", "trained_under.json",
    ]  # fmt: skip
    want = whole / meta_multitask.MULTITASK_DIR
    assert (kept / "train_log.jsonl").read_text() == (want / "train_log.jsonl").read_text()
    got = load_file(kept / "adapter" / "adapter_model.safetensors")
    ref = load_file(want / "adapter" / "adapter_model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
