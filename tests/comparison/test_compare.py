"""``blob-lora compare``: the experiment file, the tables rendered from run folders, and
re-runs that skip finished runs and add missing evaluations without retraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from blob_lora.cli.main import main
from blob_lora.comparison import load_spec, plan, run_compare, spec_from_dict
from blob_lora.comparison.compare import config_differences
from blob_lora.training.config import TrainConfig
from blob_lora.utils.errors import ConfigError
from tests.factories import tiny_compare_experiment, tiny_model_folder

torch.set_num_threads(1)


# ------------------------------------------------------------------ fabricated run folders


def fabricate(spec, task, method, seed, evaluations, key="evaluations", subdir="eval"):
    """A finished run folder as the trainer leaves it, with the given metrics per eval task."""
    d = spec.out / "runs" / task.replace(":", "__") / method / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.from_dict(spec.run_settings(task, method, seed, d))
    (d / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    summary_path = d / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.setdefault("train_seconds", 10.0 * seed)
    for eval_task, (acc, ece, nll, brier) in evaluations.items():
        split = spec.eval_split(eval_task, own=eval_task == task)
        summary.setdefault(key, {})[eval_task] = {
            "accuracy": acc,
            "ece": ece,
            "nll": nll,
            "brier": brier,
            "split": split,
            "eval_samples": 0 if key == "evaluations_mean" else 10,
            "eval_seconds": 1.5,
        }
        pred_dir = d / subdir / eval_task.replace(":", "__")
        pred_dir.mkdir(parents=True, exist_ok=True)
        rows = [
            {"label": i % 2, "probs": [acc, 1 - acc] if i % 2 == 0 else [1 - acc, acc]}
            for i in range(4)
        ]
        (pred_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary_path.write_text(json.dumps(summary))
    return d


@pytest.fixture
def two_method_spec(tmp_path):
    return spec_from_dict(
        {
            "methods": ["lora", "blob"],
            "tasks": ["arc_easy"],
            "seeds": [1, 2],
            "ood": {"train_task": "arc_easy", "eval_tasks": ["mmlu:college_physics"]},
            "train": {"max_steps": 5},
            "eval_split_overrides": {
                "arc_easy": "validation[:4]",
                "mmlu:college_physics": "test[:4]",
            },
        },
        name="fab",
        out=tmp_path / "out",
    )


def test_tables_from_fabricated_runs(two_method_spec):
    spec = two_method_spec
    # lora: acc .5/.7 -> 60.00 ± 14.14; blob: .65/.75 -> 70.00 ± 7.07 (best)
    fabricate(spec, "arc_easy", "lora", 1, {"arc_easy": (0.5, 0.20, 1.2, 0.60)})
    fabricate(spec, "arc_easy", "lora", 2, {"arc_easy": (0.7, 0.30, 1.0, 0.40)})
    fabricate(spec, "arc_easy", "blob", 1, {"arc_easy": (0.65, 0.05, 0.8, 0.45)})
    fabricate(spec, "arc_easy", "blob", 2, {"arc_easy": (0.75, 0.07, 0.9, 0.55)})
    # OOD: only lora seed 1 evaluated there
    fabricate(spec, "arc_easy", "lora", 1, {"mmlu:college_physics": (0.25, 0.4, 2.0, 0.9)})

    result = run_compare(spec, collect_only=True, echo=lambda s: None)
    md = (spec.out / "results_id.md").read_text()
    assert "| method | arc_easy |" in md
    assert "| lora | 60.00 ± 14.14 |" in md
    assert "| blob | **70.00 ± 7.07** |" in md
    assert "| lora | 25.00 ± 7.07 |" in md  # ECE in %
    assert "| blob | **6.00 ± 1.41** |" in md
    assert "| lora | 1.100 ± 0.141 |" in md  # NLL
    assert "| blob | **0.850 ± 0.071** |" in md
    # Brier ties at 0.500 as printed: both bold
    assert "| lora | **0.500 ± 0.141** |" in md and "| blob | **0.500 ± 0.071** |" in md

    ood = (spec.out / "results_ood.md").read_text()
    assert "| method | arc_easy (ID) | mmlu:college_physics |" in ood
    assert "| lora | 60.00 ± 14.14 | **25.00 ± 0.00** (1/2) |" in ood
    assert "| blob | **70.00 ± 7.07** | – |" in ood

    rows = (spec.out / "results_id.csv").read_text().splitlines()
    assert rows[0] == "setting,metric,task,method,mean,std,n,best,cell"
    assert "id,accuracy,arc_easy,blob,70,7.07107,2,1,**70.00 ± 7.07**" in rows

    saved = json.loads((spec.out / "compare.json").read_text())
    assert saved == json.loads(json.dumps(result))
    cell = saved["id"]["table"]["accuracy"]["arc_easy"]["lora"]
    assert cell["values"] == pytest.approx([50.0, 70.0]) and cell["n"] == 2
    by_dir = {r["dir"]: r for r in saved["runs"]}
    lora1 = by_dir["runs/arc_easy/lora/seed1"]
    assert lora1["train_seconds"] == 10.0 and lora1["status"] == "done"
    assert lora1["eval_seconds"]["lora"] == {"arc_easy": 1.5, "mmlu:college_physics": 1.5}
    assert by_dir["runs/arc_easy/blob/seed1"]["status"] == "evaluate"  # OOD eval missing
    assert (spec.out / "reliability_arc_easy.png").stat().st_size > 1000
    assert (spec.out / "reliability_ood_mmlu__college_physics.png").is_file()
    assert saved["plots"] == [
        "reliability_arc_easy.png",
        "reliability_ood_mmlu__college_physics.png",
    ]


def test_blob_mean_reads_the_blob_runs_mean_evaluations(tmp_path):
    spec = spec_from_dict(
        {
            "methods": ["blob", "blob-mean"],
            "tasks": ["arc_easy"],
            "seeds": [1],
            "eval_split_overrides": {"arc_easy": "validation[:4]"},
        },
        name="m",
        out=tmp_path / "o",
    )
    runs = plan(spec)
    assert [(r.method, r.seed) for r in runs] == [("blob", 1)]  # no extra training
    assert [(e.column.name, e.task) for e in runs[0].evaluations] == [
        ("blob", "arc_easy"),
        ("blob-mean", "arc_easy"),
    ]
    fabricate(spec, "arc_easy", "blob", 1, {"arc_easy": (0.6, 0.1, 1.0, 0.5)})
    assert plan(spec)[0].status == "evaluate"  # the N = 0 evaluation is still missing
    fabricate(
        spec,
        "arc_easy",
        "blob",
        1,
        {"arc_easy": (0.5, 0.2, 1.1, 0.6)},
        "evaluations_mean",
        "eval_mean",
    )
    assert plan(spec)[0].status == "done"
    run_compare(spec, collect_only=True, echo=lambda s: None)
    md = (spec.out / "results_id.md").read_text()
    assert "| blob | **60.00 ± 0.00** |" in md and "| blob-mean | 50.00 ± 0.00 |" in md


def test_runs_are_planned_seed_first_then_method_then_task(tmp_path):
    spec = spec_from_dict(
        {"methods": ["lora", "blob", "blob-mean"], "tasks": ["arc_easy", "boolq"], "seeds": [2, 1]},
        name="m",
        out=tmp_path / "o",
    )
    assert [(r.seed, r.method, r.task) for r in plan(spec)] == [
        (2, "lora", "arc_easy"),
        (2, "lora", "boolq"),
        (2, "blob", "arc_easy"),
        (2, "blob", "boolq"),
        (1, "lora", "arc_easy"),
        (1, "lora", "boolq"),
        (1, "blob", "arc_easy"),
        (1, "blob", "boolq"),
    ]


def test_run_first_methods_finish_every_seed_before_the_others(tmp_path):
    spec = spec_from_dict(
        {
            "methods": ["lora", "blob", "blob-mean", "map", "ensemble"],
            "tasks": ["arc_easy"],
            "seeds": [1, 2],
            "run_first": ["blob-mean", "map"],  # a column stands for the method that trains it
        },
        name="m",
        out=tmp_path / "o",
    )
    assert [(r.seed, r.method) for r in plan(spec)] == [
        (1, "blob"),
        (1, "map"),
        (2, "blob"),
        (2, "map"),
        (1, "lora"),
        (1, "ensemble"),
        (2, "lora"),
        (2, "ensemble"),
    ]
    assert spec.to_dict()["run_first"] == ["blob-mean", "map"]
    with pytest.raises(ConfigError, match=r"run_first names \['laplace'\]"):
        spec_from_dict({"methods": ["lora"], "tasks": ["arc_easy"], "run_first": ["laplace"]}, "m")


def test_run_first_tiers_finish_every_seed_in_order(tmp_path):
    spec = spec_from_dict(
        {
            "methods": ["lora", "blob", "blob-mean", "map", "ensemble", "laplace"],
            "tasks": ["arc_easy"],
            "seeds": [1, 2],
            # blob-mean stands for blob, already placed in the first tier: not trained twice
            "run_first": [["blob", "lora"], ["ensemble", "blob-mean"], ["map"]],
        },
        name="m",
        out=tmp_path / "o",
    )
    assert [(r.seed, r.method) for r in plan(spec)] == [
        (1, "lora"),
        (1, "blob"),
        (2, "lora"),
        (2, "blob"),
        (1, "ensemble"),
        (2, "ensemble"),
        (1, "map"),
        (2, "map"),
        (1, "laplace"),
        (2, "laplace"),
    ]
    assert spec.to_dict()["run_first"] == [["blob", "lora"], ["ensemble", "blob-mean"], ["map"]]
    with pytest.raises(ConfigError, match="in two tiers"):
        spec_from_dict(
            {"methods": ["lora", "map"], "tasks": ["arc_easy"], "run_first": [["lora"], ["lora"]]},
            "m",
        )
    with pytest.raises(ConfigError, match=r"run_first names \['swag'\]"):
        spec_from_dict(
            {"methods": ["lora"], "tasks": ["arc_easy"], "run_first": [["lora"], ["swag"]]}, "m"
        )
    with pytest.raises(ConfigError, match="tier must not be empty"):
        spec_from_dict(
            {"methods": ["lora"], "tasks": ["arc_easy"], "run_first": [["lora"], []]}, "m"
        )


def test_a_run_made_before_a_setting_existed_ran_with_its_default(two_method_spec):
    """A new option must not orphan the finished runs of every experiment: a stored
    run_config.json without it compares as that option's default; another value still differs."""
    d = fabricate(two_method_spec, "arc_easy", "lora", 1, {"arc_easy": (0.5, 0.1, 0.7, 0.3)})
    stored = json.loads((d / "run_config.json").read_text())
    del stored["recipe"], stored["eval_noise"]
    (d / "run_config.json").write_text(json.dumps(stored))
    r = next(r for r in plan(two_method_spec) if r.method == "lora" and r.seed == 1)
    assert config_differences(r) == []
    stored["lr"] = 0.5
    (d / "run_config.json").write_text(json.dumps(stored))
    assert config_differences(r) == [f"lr (0.5 -> {TrainConfig().loop.lr!r})"]


def test_a_changed_eval_split_counts_as_missing(two_method_spec):
    spec = two_method_spec
    fabricate(spec, "arc_easy", "lora", 1, {"arc_easy": (0.5, 0.2, 1.2, 0.6)})
    spec.eval_split_overrides["arc_easy"] = "validation[:8]"
    r = next(r for r in plan(spec) if r.method == "lora" and r.seed == 1)
    assert [e.task for e in r.missing] == ["arc_easy", "mmlu:college_physics"]


def test_how_a_run_is_scored_is_not_what_it_learned(tmp_path):
    """Another evaluation split, N or weight noise re-scores the evaluations it changes (each
    evaluation's own record says how it was scored); it never makes a run stale."""
    spec = spec_from_dict(
        {
            "methods": ["lora", "blob", "blob-mean"],
            "tasks": ["arc_easy"],
            "train": {"max_steps": 5},
            "eval_split_overrides": {"arc_easy": "validation[:4]"},
        },
        name="fab",
        out=tmp_path / "out",
    )
    d = fabricate(spec, "arc_easy", "blob", 1, {"arc_easy": (0.5, 0.2, 1.2, 0.6)})
    fabricate(spec, "arc_easy", "blob", 1, {"arc_easy": (0.5, 0.2, 1.2, 0.6)}, "evaluations_mean")
    lora = fabricate(spec, "arc_easy", "lora", 1, {"arc_easy": (0.5, 0.2, 1.2, 0.6)})
    summary = json.loads((lora / "summary.json").read_text())
    summary["evaluations"]["arc_easy"]["eval_samples"] = 0  # LoRA's predictive: N = 0
    (lora / "summary.json").write_text(json.dumps(summary))

    def own_missing(method: str) -> list[str]:
        r = next(r for r in plan(spec) if r.method == method and r.seed == 1)
        assert config_differences(r) == []
        return [e.column.name for e in r.missing if e.task == "arc_easy"]

    assert own_missing("blob") == [] and own_missing("lora") == []
    spec.train["eval_samples"] = 10  # BLoB's default, asked for by name: the same request
    assert own_missing("blob") == []
    # N: the stored request was the default (None); asking 3 re-scores blob's sampled
    # evaluation only (not its mean one, not LoRA's N = 0)
    spec.train["eval_samples"] = 3
    assert own_missing("blob") == ["blob"] and own_missing("lora") == []
    summary = json.loads((d / "summary.json").read_text())
    summary["evaluations"]["arc_easy"].update(eval_samples=3, requested_samples=3)
    (d / "summary.json").write_text(json.dumps(summary))
    assert own_missing("blob") == []
    # the request is compared, not the N used (an ensemble of 3 asked for 10 uses 3)
    spec.train["eval_samples"] = 10
    assert own_missing("blob") == ["blob"]
    # an unset N is the default a new run gets (BLoB's 10), not the N this run's adapter keeps
    del spec.train["eval_samples"]
    assert own_missing("blob") == ["blob"]
    spec.train["eval_samples"] = 10
    assert own_missing("blob") == ["blob"]
    # a deliberate N = 0 is a request like any other: asking 3 then re-scores it
    summary["evaluations"]["arc_easy"].update(eval_samples=0, requested_samples=0)
    (d / "summary.json").write_text(json.dumps(summary))
    spec.train["eval_samples"] = 0
    assert own_missing("blob") == []
    spec.train["eval_samples"] = 3
    assert own_missing("blob") == ["blob"]
    summary["evaluations"]["arc_easy"].update(eval_samples=3, requested_samples=3)
    (d / "summary.json").write_text(json.dumps(summary))
    # weight noise, where the evaluation drew samples with one
    summary["evaluations"]["arc_easy"]["eval_noise"] = "sequence"
    (d / "summary.json").write_text(json.dumps(summary))
    assert own_missing("blob") == []
    spec.train["eval_noise"] = "token"
    assert own_missing("blob") == ["blob"] and own_missing("lora") == []
    # the split
    spec.train["eval_noise"] = "sequence"
    spec.eval_split_overrides["arc_easy"] = "validation[:8]"
    assert own_missing("blob") == ["blob", "blob-mean"] and own_missing("lora") == ["lora"]
    # what a run learned still makes it stale
    spec.train["lr"] = 0.5
    r = next(r for r in plan(spec) if r.method == "blob")
    assert config_differences(r) == [f"lr ({TrainConfig().loop.lr!r} -> 0.5)"]


def test_data_changed_since_a_run_is_scored_again_or_refused(two_method_spec):
    """A finished run records the data it scored (metrics' ``data``) and trained on
    (summary's ``train_data``): changed evaluation data is scored again; changed training
    data makes the run stale, as changed settings do. Runs from before the record pass."""
    from blob_lora.tasks import get_task

    spec = two_method_spec
    d = fabricate(spec, "arc_easy", "lora", 1, {"arc_easy": (0.5, 0.2, 1.2, 0.6)})
    r = next(r for r in plan(spec) if r.method == "lora" and r.seed == 1)
    assert [e.task for e in r.missing] == ["mmlu:college_physics"]  # no record: as before
    summary = json.loads((d / "summary.json").read_text())
    task = get_task("arc_easy")
    summary["evaluations"]["arc_easy"]["data"] = task.source_fingerprint("validation[:4]")
    summary["train_data"] = task.source_fingerprint("train")
    (d / "summary.json").write_text(json.dumps(summary))
    r = next(r for r in plan(spec) if r.method == "lora" and r.seed == 1)
    assert [e.task for e in r.missing] == ["mmlu:college_physics"]  # the same data
    assert config_differences(r) == []

    summary["evaluations"]["arc_easy"]["data"] = "file:ARC-Easy-Validation.jsonl:0ld|validation"
    summary["train_data"] = "file:ARC-Easy-Train.jsonl:0ld|train"
    (d / "summary.json").write_text(json.dumps(summary))
    r = next(r for r in plan(spec) if r.method == "lora" and r.seed == 1)
    assert [e.task for e in r.missing] == ["arc_easy", "mmlu:college_physics"]
    assert config_differences(r) == ["the training data (changed since the run was trained)"]


# ------------------------------------------------------------------ the experiment file


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"methods": ["lora", "bogus"], "tasks": ["arc_easy"]}, "unknown method 'bogus'"),
        ({"methods": ["lora"], "tasks": ["arc_easy"], "train": {"seed": 3}}, "may not set"),
        ({"methods": ["lora"], "tasks": ["arc_easy"], "train": {"lrr": 1}}, "unknown settings"),
        ({"methods": ["lora"], "tasks": ["a"], "method_options": {"blob": {}}}, "no listed method"),
        ({"methods": ["lora"], "tasks": ["arc_easy"], "seeds": [1, 1]}, "seeds"),
        ({"methods": ["lora"], "tasks": ["arc_easy"], "train": {"lr": -1}}, "--lr"),
        ({"methods": ["lora"], "tasks": ["arc_easy"], "extra": 1}, "unknown keys"),
        ({"tasks": ["arc_easy"]}, "needs 'methods'"),
        # a -mean column needs a method that reports its mean weights
        ({"methods": ["lora-mean"], "tasks": ["arc_easy"]}, "unknown method 'lora-mean'"),
        ({"methods": ["v"], "tasks": ["a"], "variants": {"v": {"lr": 1}}}, "needs 'method"),
        ({"methods": ["v"], "tasks": ["a"], "variants": {"v": {"method": "x"}}}, "unknown method"),
        (
            {"methods": ["blob"], "tasks": ["a"], "variants": {"blob": {"method": "lora"}}},
            "may not",
        ),
        (
            {"methods": ["v"], "tasks": ["a"], "variants": {"v": {"method": "blob", "seed": 2}}},
            "may not set",
        ),
        (
            {"methods": ["v"], "tasks": ["a"], "variants": {"v": {"method": "blob", "lr": -1}}},
            "--lr",
        ),
        # a setting given for one method that it does not read would change nothing
        (
            {"methods": ["lora"], "tasks": ["a"], "method_options": {"lora": {"prior_std": 1}}},
            r"method_options.lora sets \['prior_std'\], which method 'lora' does not read",
        ),
        (
            {"methods": ["v"], "tasks": ["a"], "variants": {"v": {"method": "swag", "kl_lr": 1}}},
            r"variants.v sets \['kl_lr'\], which method 'swag' does not read",
        ),
        # the wrong kind of value: a clear refusal, not a traceback
        ({"methods": ["lora"], "tasks": ["a"], "method_options": ["lora"]}, "must map names"),
        ({"methods": ["lora"], "tasks": ["a"], "task_options": ["a"]}, "must map names"),
        ({"methods": ["lora"], "tasks": ["a"], "out": 5}, "out must be a folder path"),
        # a task the experiment never uses (a typo) would silently change nothing
        (
            {"methods": ["lora"], "tasks": ["arc_easy"], "eval_split_overrides": {"arc-easy": "x"}},
            r"eval_split_overrides names \['arc-easy'\]",
        ),
        (
            {"methods": ["lora"], "tasks": ["arc_easy"], "task_options": {"arc-easy": {}}},
            r"task_options names \['arc-easy'\]",
        ),
        (
            {
                "methods": ["lora"],
                "tasks": ["arc_easy"],
                "ood": {"train_task": "arc_easy", "eval_tasks": ["openbookqa"]},
                "task_options": {"openbookqa": {"lr": 0.1}},
            },
            "only evaluated",
        ),
    ],
)
def test_bad_experiment_files_are_refused(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_dict(data, name="x", out=tmp_path)


def test_spec_precedence_and_defaults(tmp_path):
    path = tmp_path / "paper.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "methods": ["map", "blob"],
                "tasks": ["boolq", "arc_easy"],
                "train": {"lr": 0.001, "max_steps": 10, "eval_split": "validation[:50]"},
                "method_options": {"blob": {"lr": 0.002}},
                "task_options": {
                    "boolq": {"train_split": "validation[:2270]", "eval_split": "validation[2270:]"}
                },
            }
        )
    )
    spec = load_spec(path)
    assert spec.name == "paper" and spec.out == Path("runs/compare/paper")
    assert spec.seeds == [1, 2, 3]
    assert load_spec(path, out=tmp_path / "o").out == tmp_path / "o"
    s = spec.run_settings("boolq", "blob", 2, Path("d"))
    assert s["lr"] == 0.002 and s["seed"] == 2 and s["method"] == "blob"
    assert s["train_split"] == "validation[:2270]" and s["eval_split"] == "validation[2270:]"
    assert spec.run_settings("arc_easy", "map", 1, Path("d"))["eval_split"] == "validation[:50]"
    assert len(plan(spec)) == 2 * 2 * 3


def test_variants_train_their_method_under_their_settings_in_their_own_runs(tmp_path):
    """A variant is the same method again under other settings (BLoB's paper recipe beside
    another), with its own run folders and its own -mean column."""
    spec = spec_from_dict(
        {
            "methods": ["lora", "blob", "blob-elbo", "blob-elbo-mean", "bayesian-lora-mean"],
            "tasks": ["arc_easy"],
            "seeds": [1],
            "train": {"lr": 0.001, "max_steps": 10},
            "method_options": {"blob": {"eval_samples": 5}},
            "variants": {"blob-elbo": {"method": "blob", "kl_schedule": "elbo", "lr": 0.003}},
            "task_options": {"arc_easy": {"lr": 0.004}},
        },
        name="v",
        out=tmp_path,
    )
    assert spec.train_methods == ["lora", "blob", "blob-elbo", "bayesian-lora"]
    s = spec.run_settings("arc_easy", "blob-elbo", 1, Path("d"))
    # train < method_options[blob] < the variant < task_options
    assert s["method"] == "blob" and s["kl_schedule"] == "elbo" and s["eval_samples"] == 5
    assert s["lr"] == 0.004
    assert "kl_schedule" not in spec.run_settings("arc_easy", "blob", 1, Path("d"))
    runs = {r.method: r for r in plan(spec)}
    assert runs["blob-elbo"].dir == tmp_path / "runs" / "arc_easy" / "blob-elbo" / "seed1"
    cols = {c.name: c for c in spec.columns}
    assert cols["blob-elbo-mean"].train_method == "blob-elbo"
    assert cols["blob-elbo-mean"].eval_samples == 0 and cols["blob-elbo"].eval_samples is None
    assert cols["bayesian-lora-mean"].key == "evaluations_mean"
    assert [e.column.name for e in runs["blob-elbo"].evaluations] == ["blob-elbo", "blob-elbo-mean"]
    assert spec_from_dict(spec.to_dict(), name="v").variants == spec.variants


# ------------------------------------------------------------------ end to end on a tiny model


def test_compare_runs_then_skips_and_adds_ood_without_retraining(
    tmp_path, data_root, monkeypatch, capsys
):
    model_dir = tiny_model_folder(tmp_path / "model")
    exp = tiny_compare_experiment(
        model_dir,
        ["lora", "blob", "blob-mean"],
        eval_split_overrides={"winogrande_s": "validation[:6]"},
    )
    exp["train"]["eval_samples"] = 2
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(exp))
    out = tmp_path / "out"
    args = ["compare", "--config", str(config), "--out", str(out), "--no-progress"]
    args += ["--data-root", str(data_root)]

    assert main([*args, "--dry-run"]) == 0
    assert not out.exists()  # a dry run writes nothing

    assert main(args) == 0
    for m in ("lora", "blob"):
        assert (out / "runs" / "winogrande_s" / m / "seed1" / "summary.json").is_file()
    blob_summary = json.loads((out / "runs/winogrande_s/blob/seed1/summary.json").read_text())
    assert blob_summary["evaluations_mean"]["winogrande_s"]["eval_samples"] == 0
    assert blob_summary["evaluations"]["winogrande_s"]["eval_samples"] == 2
    assert blob_summary["evaluations"]["winogrande_s"]["requested_samples"] == 2
    md = (out / "results_id.md").read_text()
    assert "| blob-mean | " in md and "| –" not in md
    assert (out / "reliability_winogrande_s.png").is_file()

    # Re-run: nothing is trained or evaluated again.
    from blob_lora.comparison import compare as compare_mod

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_mod, "train", no_training)
    stamp = (out / "runs/winogrande_s/lora/seed1/summary.json").stat().st_mtime_ns
    real_eval = compare_mod.evaluate_on_task
    evaluated, batches = [], []

    def counting_eval(*a, **k):
        evaluated.append(a[4].name)
        batches.append(k["batch_size"])
        return real_eval(*a, **k)

    monkeypatch.setattr(compare_mod, "evaluate_on_task", counting_eval)
    assert main(args) == 0
    assert evaluated == []
    assert (out / "runs/winogrande_s/lora/seed1/summary.json").stat().st_mtime_ns == stamp

    # Adding the OOD protocol evaluates the existing runs on the new task, no training, with
    # the file's evaluation batch as it is now (the runs were trained with another)
    exp["ood"] = {"train_task": "winogrande_s", "eval_tasks": ["arc_easy"]}
    exp["eval_split_overrides"]["arc_easy"] = "validation[:4]"
    exp["train"]["eval_batch_size"] = 3
    config.write_text(yaml.safe_dump(exp))
    assert main(args) == 0
    assert sorted(evaluated) == ["arc_easy"] * 3  # lora, blob, blob-mean
    assert batches == [3, 3, 3]
    ood = (out / "results_ood.md").read_text()
    assert "| method | winogrande_s (ID) | arc_easy |" in ood and "| –" not in ood
    saved = json.loads((out / "compare.json").read_text())
    assert all(r["status"] == "done" for r in saved["runs"])
    lora = next(r for r in saved["runs"] if r["method"] == "lora")
    assert lora["train_seconds"] > 0 and lora["eval_seconds"]["lora"]["arc_easy"] > 0

    # Recording a held-out curve does not change what a run learns: not a difference.
    exp["train"].update(curve_every=2, curve_split="train[:4]")
    config.write_text(yaml.safe_dump(exp))
    assert main([*args, "--collect-only"]) == 0
    spec = load_spec(config, out=str(out))
    assert all(config_differences(r) == [] for r in plan(spec))

    # Asking for another N re-scores the evaluations that drew samples (blob's, on both
    # tasks), not LoRA's or blob-mean's, and retrains nothing; asked again, nothing moves
    evaluated.clear()
    exp["train"]["eval_samples"] = 3
    config.write_text(yaml.safe_dump(exp))
    assert main(args) == 0
    assert sorted(evaluated) == ["arc_easy", "winogrande_s"]
    blob_summary = json.loads((out / "runs/winogrande_s/blob/seed1/summary.json").read_text())
    for task in ("winogrande_s", "arc_easy"):
        scored = blob_summary["evaluations"][task]
        assert scored["eval_samples"] == 3 and scored["requested_samples"] == 3
        assert blob_summary["evaluations_mean"][task]["eval_samples"] == 0
    assert main(args) == 0
    assert sorted(evaluated) == ["arc_easy", "winogrande_s"]
    # another evaluation split of the task re-scores its own-task evaluation of every column
    evaluated.clear()
    exp["eval_split_overrides"]["winogrande_s"] = "validation[:5]"
    config.write_text(yaml.safe_dump(exp))
    assert main(args) == 0
    assert evaluated == ["winogrande_s"] * 3
    saved = json.loads((out / "compare.json").read_text())
    assert all(r["status"] == "done" for r in saved["runs"])
    lora_summary = json.loads((out / "runs/winogrande_s/lora/seed1/summary.json").read_text())
    assert lora_summary["evaluations"]["winogrande_s"]["split"] == "validation[:5]"

    # A finished run made with other settings is refused instead of mixed into the tables.
    lr = exp["train"].get("lr")
    exp["train"]["lr"] = 0.02
    config.write_text(yaml.safe_dump(exp))
    assert main(args) == 2
    # collecting still works, and leaves those runs out instead of labelling their numbers
    # with settings they were not made with
    capsys.readouterr()
    assert main([*args, "--collect-only"]) == 0
    assert "  stale      winogrande_s/lora/seed1\n" in capsys.readouterr().out
    saved = json.loads((out / "compare.json").read_text())
    assert all(r["status"] == "stale" and "lr" in r["differences"][0] for r in saved["runs"])
    cells = [c for by_task in saved["id"]["table"]["accuracy"].values() for c in by_task.values()]
    assert cells and all(not c["values"] for c in cells)

    # Dropping the OOD protocol drops its tables and diagrams too (not left beside the new)
    exp["train"]["lr"] = lr
    config.write_text(yaml.safe_dump(exp))
    assert main([*args, "--collect-only"]) == 0
    assert (out / "results_ood.md").exists() and list(out.glob("reliability_ood_*.png"))
    del exp["ood"], exp["eval_split_overrides"]["arc_easy"]
    config.write_text(yaml.safe_dump(exp))
    assert main([*args, "--collect-only"]) == 0
    assert not (out / "results_ood.md").exists() and not (out / "results_ood.csv").exists()
    assert not list(out.glob("reliability_ood_*.png")) and (out / "results_id.md").exists()


def test_an_interrupted_run_stops_the_whole_experiment(tmp_path, monkeypatch):
    """SIGINT/SIGTERM during one run must not be reported as a failure and skipped."""
    from blob_lora.comparison import compare
    from blob_lora.training.signals import TrainingInterrupted

    spec = spec_from_dict(
        {"methods": ["lora", "blob"], "tasks": ["arc_easy"], "seeds": [1]},
        name="m",
        out=tmp_path / "o",
    )
    started = []

    def interrupted(r, runs, progress):
        started.append(r.method)
        raise TrainingInterrupted("stopped by signal 15 after step 3")

    monkeypatch.setattr(compare, "_train", interrupted)
    with pytest.raises(TrainingInterrupted):
        run_compare(spec, progress=False, echo=lambda _: None)
    assert started == ["lora"]  # blob was never started


def test_missing_evaluations_use_the_runs_scoring(tmp_path, monkeypatch):
    """An evaluation compare adds later (OOD, blob-mean) scores a cloze run with cloze."""
    from types import SimpleNamespace

    from blob_lora.comparison import compare as compare_mod
    from blob_lora.comparison.compare import _evaluate_missing
    from blob_lora.tasks import Scoring

    spec = spec_from_dict(
        {
            "methods": ["lora"],
            "tasks": ["arc_easy"],
            "seeds": [1],
            "ood": {"train_task": "arc_easy", "eval_tasks": ["openbookqa"]},
            "train": {"max_steps": 5, "scoring": "cloze", "length_norm": "char"},
        },
        name="cl",
        out=tmp_path / "out",
    )
    fabricate(spec, "arc_easy", "lora", 1, {"arc_easy": (0.5, 0.2, 1.2, 0.6)})
    (run,) = plan(spec)
    cfg = TrainConfig.from_dict(json.loads((run.dir / "run_config.json").read_text()))
    monkeypatch.setattr(
        compare_mod,
        "load_run",
        lambda d: SimpleNamespace(config=cfg, **dict.fromkeys(("model", "method", "tokenizer"))),
    )
    seen = []

    def fake_eval(*a, **k):
        seen.append((a[3].name, k["scoring"]))
        return {"accuracy": 0.5, "split": "validation"}

    monkeypatch.setattr(compare_mod, "evaluate_on_task", fake_eval)
    _evaluate_missing(run, progress=False)
    assert "openbookqa" in {name for name, _ in seen}
    assert {scoring for _, scoring in seen} == {Scoring("cloze", "char")}


def test_missing_evaluations_use_the_runs_eval_noise(tmp_path, monkeypatch):
    """``train: {eval_noise: token}`` (issue 21.5): evaluations compare adds use it too."""
    from types import SimpleNamespace

    from blob_lora.comparison import compare as compare_mod
    from blob_lora.comparison.compare import _evaluate_missing

    spec = spec_from_dict(
        {
            "methods": ["blob", "blob-mean"],
            "tasks": ["arc_easy"],
            "seeds": [1],
            "ood": {"train_task": "arc_easy", "eval_tasks": ["openbookqa"]},
            "train": {"max_steps": 5, "eval_noise": "token"},
        },
        name="noise",
        out=tmp_path / "out",
    )
    fabricate(spec, "arc_easy", "blob", 1, {"arc_easy": (0.5, 0.2, 1.2, 0.6)})
    (run,) = plan(spec)
    cfg = TrainConfig.from_dict(json.loads((run.dir / "run_config.json").read_text()))
    assert cfg.blob.eval_noise == "token"
    monkeypatch.setattr(
        compare_mod,
        "load_run",
        lambda d: SimpleNamespace(config=cfg, **dict.fromkeys(("model", "method", "tokenizer"))),
    )
    seen = []

    def fake_eval(*a, **k):
        seen.append((k["n_samples"], k["eval_noise"]))
        return {"accuracy": 0.5, "split": "validation", "eval_samples": k["n_samples"]}

    monkeypatch.setattr(compare_mod, "evaluate_on_task", fake_eval)
    _evaluate_missing(run, progress=False)
    # the sampled OOD evaluation (N: asked for explicitly, the default a new run gets, not
    # the one the adapter keeps) and the blob-mean ones (N = 0, noise moot)
    assert (10, "token") in seen and {noise for _, noise in seen} == {"token"}


@pytest.mark.parametrize("depth", ["over 255 bytes", "230 bytes"])
def test_a_task_folder_deep_enough_to_overflow_a_file_name_compares(tmp_path, depth):
    """A task folder's whole path names its results, claims and plots: past 255 bytes a
    file name fails (the claim's lock before any training, the plot after all of it). A
    folder name earlier runs could write (230 bytes) stays as it was, so they are found."""
    from blob_lora.tasks.dir_names import task_dir_name

    if depth == "230 bytes":
        deep = tmp_path / ("x" * (230 - len(str(tmp_path)) - 1))
        assert len(str(deep).encode()) == 230
    else:
        deep = tmp_path.joinpath(*[f"a-long-descriptive-folder-name-part-{i}" for i in range(8)])
        assert len(str(deep).encode()) > 255
    deep.mkdir(parents=True)
    rows = [
        {"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(8)
    ]
    for split, part in (("train", rows), ("validation", rows[:4])):
        (deep / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    model = tiny_model_folder(tmp_path / "model")
    exp = tiny_compare_experiment(model, ["lora"], tasks=[str(deep)], eval_split_overrides={})
    exp["train"].pop("train_split")
    config = tmp_path / "deep.yaml"
    config.write_text(yaml.safe_dump(exp))
    out = tmp_path / "out"
    assert main(["compare", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    assert "| lora |" in (out / "results_id.md").read_text()
    (plot,) = out.glob("reliability_*.png")
    assert len(plot.name.encode()) <= 200 and plot.name.endswith(f"{deep.name[-40:]}.png")
    (run_folder,) = (out / "runs").iterdir()
    assert run_folder.name == task_dir_name(str(deep))
    if depth == "230 bytes":  # unchanged: the sanitised path itself
        assert run_folder.name == str(deep).replace("/", "_")
    else:  # its end after a digest, short enough for a file name
        assert len(run_folder.name.encode()) <= 128 and run_folder.name.endswith("part-7")
