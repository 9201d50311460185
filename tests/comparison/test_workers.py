"""Several ``blob-lora compare`` processes on one experiment: claims, and the order they work in.

A claim must exclude every other holder until released, die with its process, and never make
two processes train one run; a composite run (ensemble, Laplace) must wait for a run of its
task and seed that another process is training, then copy it instead of training it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from blob_lora.comparison import compare as compare_mod
from blob_lora.comparison import plan, run_compare, spec_from_dict
from blob_lora.comparison.claims import RunClaims
from tests.comparison.test_compare import fabricate
from tests.factories import tiny_compare_experiment, tiny_model_folder

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def _spec(tmp_path, methods, seeds=(1,)):
    return spec_from_dict(
        {
            "methods": list(methods),
            "tasks": ["arc_easy"],
            "seeds": list(seeds),
            "eval_split_overrides": {"arc_easy": "validation[:4]"},
        },
        name="w",
        out=tmp_path / "out",
    )


def _fake_training(spec, trained, seen_shareable=None):
    """A ``_train`` that records the run and leaves it finished, as the trainer would."""

    def fake(r, runs, progress):
        trained.append(r.label)
        if seen_shareable is not None:
            seen_shareable[r.label] = compare_mod.shareable_runs(r, runs)
        fabricate(spec, r.task, r.method, r.seed, {"arc_easy": (0.5, 0.1, 1.0, 0.5)})

    return fake


def test_a_claim_excludes_every_other_holder_until_released(tmp_path):
    claims = RunClaims(tmp_path)
    lock = claims.take("arc_easy/lora/seed1")
    assert lock is not None
    assert claims.take("arc_easy/lora/seed1") is None  # another claim, same process
    assert claims.held("arc_easy/lora/seed1") and not claims.held("arc_easy/lora/seed2")
    probe = (
        "import sys; from pathlib import Path; from blob_lora.comparison.claims import RunClaims;"
        f"print(RunClaims(Path({str(tmp_path)!r})).held('arc_easy/lora/seed1'))"
    )
    seen = subprocess.run([sys.executable, "-c", probe], env=CHILD_ENV, capture_output=True)
    assert seen.stdout.decode().strip() == "True"  # another process sees it held
    lock.release()
    assert not claims.held("arc_easy/lora/seed1")


def test_a_killed_process_leaves_no_claim(tmp_path):
    holder = (
        "import sys, time; from pathlib import Path; from blob_lora.comparison.claims import "
        f"RunClaims; lock = RunClaims(Path({str(tmp_path)!r})).take('t/blob/seed3');"
        "print(lock is not None, flush=True); time.sleep(600)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", holder], env=CHILD_ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "True"
        assert RunClaims(tmp_path).held("t/blob/seed3")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not RunClaims(tmp_path).held("t/blob/seed3")  # the OS dropped it with the process


def test_runs_another_process_holds_are_left_to_it(tmp_path, monkeypatch):
    spec = _spec(tmp_path, ["lora", "blob"], seeds=(1, 2))
    trained: list[str] = []
    monkeypatch.setattr(compare_mod, "_train", _fake_training(spec, trained))
    monkeypatch.setattr(compare_mod, "_evaluate_missing", lambda r, progress: None)
    other = RunClaims(spec.out).take("arc_easy/lora/seed1")  # "another process" works on it
    said: list[str] = []
    result = run_compare(spec, progress=False, echo=said.append)
    assert trained == ["arc_easy/blob/seed1", "arc_easy/lora/seed2", "arc_easy/blob/seed2"]
    assert said[-1] == "1 unfinished runs held by other processes; this one stops"
    status = {(r["method"], r["seed"]): r["status"] for r in result["runs"]}
    assert status[("lora", 1)] == "train" and status[("blob", 2)] == "done"

    other.release()
    trained.clear()
    run_compare(spec, progress=False, echo=lambda _: None)
    assert trained == ["arc_easy/lora/seed1"]


def test_a_run_finished_elsewhere_after_planning_is_not_trained_again(tmp_path, monkeypatch):
    """The state is read again under the claim: between a process's look and its claim, the
    run may have been finished by another process."""
    spec = _spec(tmp_path, ["lora"])
    trained: list[str] = []
    monkeypatch.setattr(compare_mod, "_train", _fake_training(spec, trained))
    real_take = RunClaims.take

    def take_after_the_other_finished(self, label):
        fabricate(spec, "arc_easy", "lora", 1, {"arc_easy": (0.5, 0.1, 1.0, 0.5)})
        return real_take(self, label)

    monkeypatch.setattr(RunClaims, "take", take_after_the_other_finished)
    run_compare(spec, progress=False, echo=lambda _: None)
    assert trained == []


def test_tables_show_runs_another_process_finished_meanwhile(tmp_path, monkeypatch):
    """While this process trains seed 1, another finishes seed 2 (held by it: this one never
    touches it). The compare.json written after seed 1, and the one at the end, must count
    seed 2 as done: the states are read again before every write, not kept from the start
    (the table experiment published a finished BoolQ run as unfinished that way)."""
    spec = _spec(tmp_path, ["lora"], seeds=(1, 2))
    claims = RunClaims(spec.out)
    other = claims.take("arc_easy/lora/seed2")  # the other process's claim
    written: list[dict[str, str]] = []
    real_write = compare_mod.write_outputs

    def train_seed1_while_the_other_finishes_seed2(r, runs, progress):
        fabricate(spec, "arc_easy", "lora", 2, {"arc_easy": (0.5, 0.1, 1.0, 0.5)})
        fabricate(spec, "arc_easy", "lora", 1, {"arc_easy": (0.5, 0.1, 1.0, 0.5)})

    def recording_write(spec_, runs, plots=True):
        result = real_write(spec_, runs, plots=plots)
        written.append({row["dir"]: row["status"] for row in result["runs"]})
        return result

    monkeypatch.setattr(compare_mod, "_train", train_seed1_while_the_other_finishes_seed2)
    monkeypatch.setattr(compare_mod, "write_outputs", recording_write)
    try:
        run_compare(spec, progress=False, echo=lambda _: None)
    finally:
        other.release()
    done = {"runs/arc_easy/lora/seed1": "done", "runs/arc_easy/lora/seed2": "done"}
    assert written and all(w == done for w in written)
    saved = json.loads((spec.out / "compare.json").read_text())
    assert [r["status"] for r in saved["runs"]] == ["done", "done"]


def test_waits_for_pairs_composite_runs_with_runs_of_their_task_and_seed(tmp_path):
    spec = spec_from_dict(
        {
            "methods": ["lora", "blob", "ensemble", "laplace"],
            "tasks": ["arc_easy", "winogrande_s"],
            "seeds": [1, 2],
        },
        name="w",
        out=tmp_path / "out",
    )
    runs = {(r.task, r.method, r.seed): r for r in plan(spec)}
    ens, lap = runs[("arc_easy", "ensemble", 1)], runs[("arc_easy", "laplace", 1)]
    lora, blob = runs[("arc_easy", "lora", 1)], runs[("arc_easy", "blob", 1)]
    assert compare_mod.waits_for(ens, [lora]) and compare_mod.waits_for(lap, [ens])
    assert compare_mod.waits_for(lora, [ens])  # the ensemble may be training member 0 itself
    assert not compare_mod.waits_for(blob, [lora])  # neither copies the other
    assert not compare_mod.waits_for(ens, [runs[("arc_easy", "lora", 2)]])
    assert not compare_mod.waits_for(ens, [runs[("winogrande_s", "lora", 1)]])
    assert not compare_mod.waits_for(ens, [ens])


def test_a_composite_run_waits_for_the_run_it_copies_then_copies_it(tmp_path, monkeypatch):
    spec = _spec(tmp_path, ["lora", "blob", "ensemble"])
    trained: list[str] = []
    shareable: dict[str, list[Path]] = {}
    monkeypatch.setattr(compare_mod, "_train", _fake_training(spec, trained, shareable))
    monkeypatch.setattr(compare_mod, "_evaluate_missing", lambda r, progress: None)
    other = RunClaims(spec.out).take("arc_easy/lora/seed1")
    polls: list[list[str]] = []

    def other_process_finishes_lora(seconds):
        polls.append(list(trained))
        fabricate(spec, "arc_easy", "lora", 1, {"arc_easy": (0.5, 0.1, 1.0, 0.5)})
        other.release()

    monkeypatch.setattr(compare_mod.time, "sleep", other_process_finishes_lora)
    run_compare(spec, progress=False, echo=lambda _: None)
    assert polls == [["arc_easy/blob/seed1"]]  # blob went ahead; the ensemble waited once
    assert trained == ["arc_easy/blob/seed1", "arc_easy/ensemble/seed1"]
    lora_dir = spec.out / "runs" / "arc_easy" / "lora" / "seed1"
    assert lora_dir in shareable["arc_easy/ensemble/seed1"]  # member 0 can be copied


def test_composite_sharing_reads_the_method_of_a_variant(tmp_path):
    """A variant's run (its name is not a method's) next to an ensemble: the runs it could
    share are found without asking for a method called by the variant's name."""
    spec = spec_from_dict(
        {
            "methods": ["ensemble", "blob-elbo"],
            "variants": {"blob-elbo": {"method": "blob", "optimizer": "single"}},
            "tasks": ["arc_easy"],
            "seeds": [1],
        },
        name="v",
        out=tmp_path / "out",
    )
    runs = plan(spec)
    for r in runs:
        r.dir.mkdir(parents=True)
    ens = next(r for r in runs if r.method == "ensemble")
    assert compare_mod.shareable_runs(ens, runs) == []


def test_compare_with_two_workers_shares_an_experiment_and_trains_each_run_once(
    tmp_path, data_root
):
    """One ``compare --workers 2`` command: it and the worker it starts (separate processes,
    sharing the runs through claims as separately started ``compare`` processes do) train
    every run exactly once, and the command's tables include the worker's runs."""
    model_dir = tiny_model_folder(tmp_path / "model")
    exp = tiny_compare_experiment(model_dir, ["lora", "blob", "mc-dropout"], seeds=[1, 2])
    exp["train"]["eval_samples"] = 2
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(exp))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "blob_lora.cli.main", "compare", "--config", str(config)]
    cmd += ["--out", str(out), "--no-progress", "--data-root", str(data_root)]
    cmd += ["--workers", "2", "--threads", "1"]
    done = subprocess.run(cmd, env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 more worker(s) started, 1 thread(s) each" in done.stdout
    worker_log = (out / "workers" / "worker1.log").read_text()
    logs = [done.stdout, worker_log]
    started = [
        line.split("] ", 1)[1]
        for log in logs
        for line in log.splitlines()
        if line.startswith("[") and "] train " in line
    ]
    labels = [f"winogrande_s/{m}/seed{s}" for s in (1, 2) for m in ("lora", "blob", "mc-dropout")]
    assert sorted(started) == sorted(f"train {label}" for label in labels)  # each run once
    assert all(any(label in line for line in started) for label in labels)
    # the worker ran the experiment too (how many runs it got depends on how fast it started:
    # on a busy machine the tiny runs may all be done before its imports are)
    assert "compare tiny: 6 runs" in worker_log
    saved = json.loads((out / "compare.json").read_text())
    assert [r["status"] for r in saved["runs"]] == ["done"] * 6
    assert "| –" not in (out / "results_id.md").read_text()
    for label in labels:  # one training each: a single train log, steps 1..2 once
        log = (out / "runs" / label / "train_log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in log] == [1, 2]


def test_claims_live_outside_the_run_folders(tmp_path, monkeypatch):
    spec = _spec(tmp_path, ["lora"])
    monkeypatch.setattr(compare_mod, "_train", _fake_training(spec, []))
    run_compare(spec, progress=False, echo=lambda _: None)
    run = spec.out / "runs" / "arc_easy" / "lora" / "seed1"
    assert not [p for p in run.rglob("*") if p.suffix == ".lock"]
    assert (spec.out / ".claims").is_dir()


def test_failures_seen_by_another_process_reach_compare_json(tmp_path, monkeypatch):
    """``--workers``: the tables are written last from a fresh plan, which alone would list a
    run that failed in this process as still to train; ``failed`` marks it."""
    spec = _spec(tmp_path, ["lora", "blob"])
    monkeypatch.setattr(compare_mod, "_train", _fake_training(spec, []))
    run_compare(spec, progress=False, echo=lambda _: None)
    (spec.out / "runs" / "arc_easy" / "blob" / "seed1" / "summary.json").unlink()
    result = run_compare(
        spec, collect_only=True, echo=lambda _: None, failed={"arc_easy/blob/seed1": "diverged"}
    )
    saved = json.loads((spec.out / "compare.json").read_text())
    status = {r["method"]: (r["status"], r["error"]) for r in saved["runs"]}
    assert status == {"lora": ("done", None), "blob": ("failed", "diverged")}
    assert saved["failed"] == result["failed"] == ["arc_easy/blob/seed1: diverged"]


def test_a_run_that_failed_in_one_process_is_not_tried_again_by_the_others(tmp_path, monkeypatch):
    """The processes of one ``--workers`` command share their failures: the second process
    does not train the run the first saw fail (it would fail again, after as long), reports it
    with the first one's error, and a cleared board (a new command) tries it again."""
    from blob_lora.comparison.workers import SharedFailures
    from blob_lora.utils.errors import BlobLoraError

    spec = _spec(tmp_path, ["lora", "blob"])
    trained = []
    fake = _fake_training(spec, trained)

    def failing_blob(r, runs, progress):
        if r.method == "blob":
            trained.append(r.label)
            raise BlobLoraError("diverged at step 3")
        fake(r, runs, progress)

    monkeypatch.setattr(compare_mod, "_train", failing_blob)
    board = SharedFailures(spec.out / "workers" / "failed")
    first = run_compare(spec, progress=False, echo=lambda _: None, shared_failures=board)
    assert first["failed"] == ["arc_easy/blob/seed1: diverged at step 3"]
    assert board.all() == {"arc_easy/blob/seed1": "diverged at step 3"}
    trained.clear()
    second = run_compare(spec, progress=False, echo=lambda _: None, shared_failures=board)
    assert trained == [] and second["failed"] == first["failed"]
    board.clear()
    run_compare(spec, progress=False, echo=lambda _: None, shared_failures=board)
    assert trained == ["arc_easy/blob/seed1"]
