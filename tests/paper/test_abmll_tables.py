"""``paper/abmll_tables.py`` on the tiny model and a folder of tiny tasks: the selection never
sees a task any seed holds out, picks the grid point its metric says, the table averages what
the runs wrote, a second invocation runs nothing again, and bad plans are refused by name."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml

import abmll_tables
from blob_lora.utils.errors import ConfigError
from tests.factories import tiny_model_folder, tiny_task_collection

torch.set_num_threads(1)


def write_plan(root: Path, **changes) -> Path:
    model = tiny_model_folder(root / "model")
    tasks = tiny_task_collection(root / "tasks", n_tasks=8, n_questions=10)
    plan = {
        "name": "tiny",
        "out": str(root / "out"),
        "seeds": [1, 2],
        "baselines": ["zero-shot", "lora-support"],
        "meta": {
            "tasks": str(tasks),
            "model": str(model),
            "meta_test_tasks": 2,
            "k_shot": 3,
            "query_size": 4,
            "eval_size": 4,
            "meta_steps": 2,
            "max_length": 96,
            "lora_r": 2,
            "abmll_inner_steps": 1,
        },
        "select": {"validation_tasks": 2, "grid": {"abmll_gamma": [0.0, 1.0e-7]}},
    }
    plan.update(changes)
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("abmll_tables")
    path = write_plan(root)
    assert abmll_tables.main([str(path), "--no-progress"]) == 0
    return root, path


def test_selection_never_sees_a_task_a_seed_holds_out(finished) -> None:
    root, path = finished
    plan = abmll_tables.load_plan(path)
    out = root / "out"
    held = set()
    for seed in plan.seeds:
        held.update(
            json.loads((out / "runs" / f"seed{seed}" / "tasks.json").read_text())["meta_test"]
        )
    assert held == set(abmll_tables.held_out_by_seeds(plan.meta, plan.seeds))
    for run in (out / "select").iterdir():
        seen = json.loads((run / "tasks.json").read_text())
        assert not held & set(seen["meta_train"] + seen["meta_test"])
        assert len(seen["meta_test"]) == 2
    selection = json.loads((out / "selection.json").read_text())
    best = min(selection["rows"], key=lambda r: r["mean"]["nll"])
    assert selection["chosen"] == best["settings"]
    assert {json.dumps(r["settings"]) for r in selection["rows"]} == {
        json.dumps({"abmll_gamma": 0.0}),
        json.dumps({"abmll_gamma": 1.0e-7}),
    }


def test_table_runs_use_the_chosen_setting_and_average_what_they_wrote(finished) -> None:
    root, _ = finished
    out = root / "out"
    chosen = json.loads((out / "selection.json").read_text())["chosen"]
    table = json.loads((out / "table.json").read_text())
    assert table["chosen"] == chosen
    for seed in (1, 2):
        run = out / "runs" / f"seed{seed}"
        saved = json.loads((run / "adapter" / "abmll_config.json").read_text())
        assert saved["gamma"] == chosen["abmll_gamma"]
        assert json.loads((run / "meta_config.json").read_text())["seed"] == seed
    for name, file in (
        ("abmll", "meta_eval.json"),
        ("lora-support", "meta_eval_lora-support.json"),
    ):
        per_seed = [
            json.loads((out / "runs" / f"seed{s}" / file).read_text())["mean"]["nll"]
            for s in (1, 2)
        ]
        row = table["contenders"][name]
        assert row["mean"]["nll"] == pytest.approx(statistics.fmean(per_seed))
        assert row["std"]["nll"] == pytest.approx(statistics.stdev(per_seed))
    md = (out / "table.md").read_text()
    assert "| zero-shot |" in md and "seed 2:" in md
    for seed in (1, 2):  # evaluation cost over all sittings: the tasks' seconds summed
        spent = json.loads((out / "runs" / f"seed{seed}" / "meta_eval.json").read_text())
        total = round(sum(spent["task_seconds"].values()), 1)
        assert table["contenders"]["abmll"]["eval_seconds"][str(seed)] == total
        assert f"- seed {seed}: abmll {total}, zero-shot" in md
    for seed in (1, 2):  # meta-training's own count of all its sittings, beside the segments
        trained = json.loads((out / "runs" / f"seed{seed}" / "tasks.json").read_text())
        stages = table["timing_s"][str(seed)]
        assert stages["meta_train_all_sittings_s"] == trained["train_seconds"] > 0
        assert len(stages["meta_train_s"]) == 1  # one segment: the run was never stopped


def test_second_invocation_runs_nothing_and_a_missing_result_is_redone(finished) -> None:
    root, path = finished
    run = root / "out" / "runs" / "seed1"
    timing = json.loads((run / "timing.json").read_text())
    before = (run / "meta_eval.json").read_bytes()
    assert abmll_tables.main([str(path), "--no-progress"]) == 0
    assert json.loads((run / "timing.json").read_text()) == timing  # nothing ran
    (run / "meta_eval_zero-shot.json").unlink()
    assert abmll_tables.main([str(path), "--no-progress", "--stage", "table"]) == 0
    again = json.loads((run / "timing.json").read_text())
    assert (
        len(again["meta_evaluate_zero-shot_s"]) == 2
        and again["meta_train_s"] == timing["meta_train_s"]
    )
    assert (run / "meta_eval.json").read_bytes() == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown keys"),
        ({"baselines": ["maml"]}, "unknown baselines"),
        ({"seeds": []}, "seeds must be"),
        ({"select": {"grid": {"abmll_gamma": []}}}, "must be a non-empty list"),
        ({"select": {"grid": {"abmll_beta": [-1.0]}}}, "beta"),
        ({"select": {"grid": {"abmll_gamma": [0.0]}, "metric": "f1"}}, "metric"),
    ],
)
def test_bad_plans_are_refused_naming_the_file(tmp_path, change, message) -> None:
    path = write_plan(tmp_path, **change)
    with pytest.raises(ConfigError, match=message) as info:
        abmll_tables.load_plan(path)
    assert str(path) in str(info.value)


def test_selection_refused_when_the_seeds_leave_too_few_tasks(tmp_path) -> None:
    # 8 tasks, 2 held out per seed: at most 6 left, too few to hold out 6 and train on any
    path = write_plan(tmp_path, select={"validation_tasks": 6, "grid": {"abmll_gamma": [0.0]}})
    plan = abmll_tables.load_plan(path)
    with pytest.raises(ConfigError, match="too few"):
        abmll_tables.selection_collection(plan)


def test_the_experiment_of_record_loads() -> None:
    plan = abmll_tables.load_plan(Path(abmll_tables.__file__).with_name("abmll_tables.yaml"))
    assert plan.select is not None and str(plan.out).startswith("paper/out/")
    assert plan.meta["scoring"] == "cloze"


def test_published_runs_carry_no_weights_and_restore_to_a_table_that_runs_nothing(
    finished, tmp_path
) -> None:
    """A new machine: the published runs (no weights) put back into an empty ``out`` make the
    next invocation train and score only what was not published, and give the same table."""
    root, path = finished
    published = tmp_path / "published"
    assert abmll_tables.main([str(path), "--publish", str(published)]) == 0
    copied = {p.relative_to(published) for p in published.rglob("*") if p.is_file()}
    assert not [p for p in copied if p.suffix in (".safetensors", ".pt")]
    # of the adapter only ABMLL's settings (the adaptation budget the baselines read), not
    # PEFT's config, which holds the base model's local path
    assert {p for p in copied if "adapter" in p.parts and p.parts[0] == "runs"} == {
        Path(f"runs/seed{s}/adapter/abmll_config.json") for s in (1, 2)
    }
    for rel in ("runs/seed1", "runs/seed2", "select/abmll_gamma=0.0", "select/abmll_gamma=1e-07"):
        assert {Path(rel) / "meta_eval.json", Path(rel) / "tasks.json"} <= copied
    assert Path("runs/seed1/meta_eval_lora-support.json") in copied
    assert {Path("selection.json"), Path("table.json")} <= copied

    shutil.rmtree(published / "runs" / "seed2")  # as if seed 2 had not finished then
    plan = yaml.safe_load(path.read_text())
    plan["out"] = str(tmp_path / "fresh")  # the same plan, a fresh out folder
    moved = tmp_path / "plan.yaml"
    moved.write_text(yaml.safe_dump(plan))
    assert abmll_tables.main([str(moved), "--restore", str(published)]) == 0
    fresh = tmp_path / "fresh"
    assert (fresh / "selection.json").read_bytes() == (root / "out" / "selection.json").read_bytes()
    assert not (fresh / "runs" / "seed2").exists()
    timing = json.loads((fresh / "runs" / "seed1" / "timing.json").read_text())
    assert abmll_tables.main([str(moved), "--no-progress"]) == 0
    assert json.loads((fresh / "runs" / "seed1" / "timing.json").read_text()) == timing
    assert "meta_train_s" in json.loads((fresh / "runs" / "seed2" / "timing.json").read_text())
    again = json.loads((fresh / "table.json").read_text())["contenders"]
    first = json.loads((root / "out" / "table.json").read_text())["contenders"]
    for name in ("abmll", "zero-shot", "lora-support"):  # seed 2 made again: the same numbers
        assert again[name]["per_seed"] == first[name]["per_seed"]


def moved_plan(path: Path, out: Path, dest: Path) -> Path:
    """``path``'s plan with ``out`` as its out folder, written to ``dest``."""
    plan = yaml.safe_load(path.read_text())
    plan["out"] = str(out)
    dest.write_text(yaml.safe_dump(plan))
    return dest


def test_a_run_owing_only_baselines_is_published_and_finished_elsewhere(finished, tmp_path):
    """A session ending while the baselines are scored: the meta-trained run is published
    with ABMLL's result, its baselines' progress and its adapter's settings (no weights); a new
    machine scores only the missing baseline, to the same numbers, and neither meta-trains nor
    scores ABMLL again. A run still owing ABMLL's result is not published: it needs the
    weights."""
    root, path = finished
    stopped = tmp_path / "stopped"
    shutil.copytree(root / "out", stopped)
    stopped_plan = moved_plan(path, stopped, tmp_path / "stopped.yaml")
    (stopped / "runs" / "seed2" / "meta_eval_lora-support.json").unlink()
    (stopped / "runs" / "seed1" / "meta_eval.json").unlink()
    published = tmp_path / "published"
    assert abmll_tables.main([str(stopped_plan), "--publish", str(published)]) == 0
    assert not (published / "runs" / "seed1").exists()
    seed2 = published / "runs" / "seed2"
    assert (seed2 / "meta_eval.json").is_file() and (seed2 / "meta_eval_zero-shot.json").is_file()
    assert not (seed2 / "meta_eval_lora-support.json").exists()
    assert not list(seed2.rglob("*.safetensors"))

    fresh = tmp_path / "fresh"
    fresh_plan = moved_plan(path, fresh, tmp_path / "fresh.yaml")
    assert abmll_tables.main([str(fresh_plan), "--restore", str(published)]) == 0
    timing = json.loads((fresh / "runs" / "seed2" / "timing.json").read_text())
    assert abmll_tables.main([str(fresh_plan), "--no-progress"]) == 0
    again = json.loads((fresh / "runs" / "seed2" / "timing.json").read_text())
    assert again["meta_train_s"] == timing["meta_train_s"]
    assert again["meta_evaluate_abmll_s"] == timing["meta_evaluate_abmll_s"]
    assert len(again["meta_evaluate_lora-support_s"]) == 2  # scored again here, and only it
    for name in ("meta_eval.json", "meta_eval_lora-support.json"):
        got, want = (
            json.loads((o / "runs" / "seed2" / name).read_text()) for o in (fresh, root / "out")
        )
        assert got["mean"] == want["mean"] and got["tasks"] == want["tasks"]

    (fresh / "runs" / "seed2" / "meta_eval.json").unlink()  # ABMLL owed, no weights here
    with pytest.raises(ConfigError, match="holds no global parameters"):
        abmll_tables.train_and_evaluate(
            fresh / "runs" / "seed2",
            {**yaml.safe_load(path.read_text())["meta"], "seed": 2},
            ["abmll"],
            progress=False,
        )


def test_a_half_made_multitask_folder_stays_behind(tmp_path) -> None:
    """Its ``trained_under.json`` without the weights would tell a new machine the weights are
    there; once the baseline's result is in, the folder (log, settings) is published."""
    run = tmp_path / "run"
    inner = Path("multitask-lora") / "trained_under.json"
    run.mkdir()
    assert abmll_tables._owes_multitask(run)
    assert abmll_tables._left_behind(inner, owes_multitask=True)
    weights = Path("multitask-lora/adapter/adapter_model.safetensors")
    assert abmll_tables._left_behind(weights, owes_multitask=True)
    assert not abmll_tables._left_behind(Path("meta_eval.json"), owes_multitask=True)
    (run / "meta_eval_multitask-lora.json").write_text("{}")
    assert not abmll_tables._owes_multitask(run)
    assert not abmll_tables._left_behind(inner, owes_multitask=False)
    checkpoint = Path("multitask-lora/checkpoints/step-50/state.json")
    assert abmll_tables._left_behind(checkpoint, owes_multitask=False)
    adapter_weights = Path("adapter/adapter_model.safetensors")
    assert abmll_tables._left_behind(adapter_weights, owes_multitask=False)
    assert not abmll_tables._left_behind(Path("adapter/abmll_config.json"), owes_multitask=False)
    assert abmll_tables._left_behind(Path("adapter/adapter_config.json"), owes_multitask=False)


def test_a_run_owing_a_contender_is_not_complete(finished) -> None:
    _, path = finished
    plan = abmll_tables.load_plan(path)
    assert len(abmll_tables.complete_runs(plan)) == 4  # two seeds, two selection points
    wider = dataclasses.replace(plan, baselines=[*plan.baselines, "blob-support"])
    assert sorted(map(str, abmll_tables.complete_runs(wider))) == [
        "select/abmll_gamma=0.0",
        "select/abmll_gamma=1e-07",
    ]
