"""The multi-task protocol on the tiny model: ``blob-lora meta-train`` then ``meta-evaluate``
end to end on a folder of tiny JSONL tasks, the saved global parameters, the determinism of
adaptation and evaluation, and bad input refused by the CLI with the option named."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from blob_lora.cli.main import main
from blob_lora.methods import method_of
from blob_lora.models.loading import load_model_and_tokenizer
from blob_lora.pipeline.meta_evaluate import meta_evaluate
from blob_lora.tuners.abmll import load_abmll_model
from blob_lora.utils.errors import ConfigError, DataError
from tests.factories import tiny_model_folder, tiny_task_collection

torch.set_num_threads(1)


def train_args(tasks, model, out, *extra: str) -> list[str]:
    return [
        "meta-train",
        "--tasks", str(tasks),
        "--model", str(model),
        "--out", str(out),
        "--meta-steps", "3",
        "--meta-test-tasks", "2",
        "--k-shot", "3",
        "--query-size", "4",
        "--max-length", "96",
        "--lora-r", "2",
        "--abmll-inner-steps", "2",
        "--seed", "1",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def timeless(result: dict) -> dict:
    """A ``meta_eval*.json`` without its wall seconds, the one thing two evaluations of the same
    run do not share."""
    assert all(s > 0 for s in result["task_seconds"].values())
    assert list(result["task_seconds"]) == list(result["tasks"])
    return {k: v for k, v in result.items() if k != "task_seconds"}


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    model = tiny_model_folder(root / "model")
    tasks = tiny_task_collection(root / "tasks", n_tasks=4, n_questions=10)
    out = root / "run"
    assert main(train_args(tasks, model, out)) == 0
    return root, model, tasks, out


def test_meta_train_writes_the_run_and_its_peft_style_adapter(meta_run):
    _, model, tasks, out = meta_run
    summary = json.loads((out / "tasks.json").read_text())
    assert len(summary["meta_train"]) == 2 and len(summary["meta_test"]) == 2
    assert sorted(summary["meta_train"] + summary["meta_test"]) == [
        str(tasks / f"task{i}") for i in range(4)
    ]
    log = [json.loads(line) for line in (out / "meta_train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) and row["query_nll"] > 0 for row in log)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    # meta-training moved the global mean away from LoRA's B = 0 start
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    assert json.loads((out / "adapter" / "abmll_config.json").read_text())["inner_steps"] == 2
    # round trip: the loaded global parameters are the saved ones, bit for bit
    base, _ = load_model_and_tokenizer(str(model))
    loaded = get_peft_model_state_dict(
        load_abmll_model(base, out / "adapter"), save_embedding_layers=False
    )
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_meta_evaluate_scores_each_held_out_task_and_is_deterministic(meta_run, capsys):
    root, _, _, out = meta_run
    assert main(["meta-evaluate", "--run", str(out), "--out", str(root / "e1")]) == 0
    printed = capsys.readouterr().out
    first = json.loads((root / "e1" / "meta_eval.json").read_text())
    held_out = json.loads((out / "tasks.json").read_text())["meta_test"]
    assert list(first["tasks"]) == held_out
    for m in first["tasks"].values():
        assert m["n_examples"] == 7  # 10 questions, 3 in the support set
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["ece"] <= 1 and m["nll"] > 0
    for key in ("accuracy", "ece", "nll", "brier"):
        per_task = [m[key] for m in first["tasks"].values()]
        assert first["mean"][key] == pytest.approx(sum(per_task) / len(per_task))
    assert first["eval_samples"] == 10 and "mean: acc" in printed
    # the adaptation budget every method of the run's comparison gets, from its saved settings
    assert first["adaptation"] == {"steps": 2, "lr": 1e-2}
    # the same run evaluated again: the same support sets, adaptation and weight samples
    assert main(["meta-evaluate", "--run", str(out), "--out", str(root / "e2")]) == 0
    assert timeless(json.loads((root / "e2" / "meta_eval.json").read_text())) == timeless(first)
    # N = 0: the adapted posterior's means, another predictive
    assert main(["meta-evaluate", "--run", str(out), "--out", str(root / "e0"),
                 "--eval-samples", "0"]) == 0  # fmt: skip
    means = json.loads((root / "e0" / "meta_eval.json").read_text())
    assert means["eval_samples"] == 0 and means["mean"]["nll"] != first["mean"]["nll"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": "missing"}, "task collection .*missing is not a folder"),
        ({"--k-shot": "0"}, "--k-shot must be an integer >= 1, got 0"),
        ({"--abmll-beta": "-1"}, "--abmll-beta must be a finite number >= 0, got -1.0"),
        ({"--meta-test-tasks": "4"}, "--meta-test-tasks must be between 1 and 3"),
        ({"--k-shot": "10"}, "has 10 questions; the protocol needs k-shot 10 plus"),
        ({"--length-norm": "char"}, "--length-norm char applies to --scoring cloze only"),
        ({"--overlong": "skip"}, "--overlong must be one of"),
        ({"--abmll-std-constant": "0"}, "--abmll-std-constant must be > 0 to meta-train"),
        ({"--target-modules": "nonexistent"}, "cannot put ABMLL's adapters on .*nonexistent"),
    ],
)
def test_bad_input_is_refused_naming_the_option(meta_run, tmp_path, capsys, change, message):
    _, model, tasks, _ = meta_run
    args = train_args(tmp_path / "missing" if "tasks" in change else tasks, model, tmp_path / "r")
    for option, value in change.items():
        if option in args:
            args[args.index(option) + 1] = value
        elif option.startswith("--"):
            args.extend([option, value])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "blob-lora meta-train: error:" in err
    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()  # nothing written on bad input


def test_an_existing_run_is_not_overwritten_and_a_plain_folder_is_no_run(meta_run, capsys):
    root, model, tasks, out = meta_run
    assert main(train_args(tasks, model, out)) == 2
    assert "already holds a finished meta-train run; pass --overwrite" in capsys.readouterr().err
    assert main(["meta-evaluate", "--run", str(root / "model")]) == 2
    assert "is not a meta-learning run folder" in capsys.readouterr().err


def test_meta_evaluate_shows_a_bar_over_held_out_tasks_unless_told_not_to(
    meta_run, tmp_path, capsys
):
    _, _, _, out = meta_run
    argv = ["meta-evaluate", "--run", str(out), "--out", str(tmp_path), "--baseline", "zero-shot"]
    assert main(argv) == 0
    assert "meta-evaluate: 100%|" in capsys.readouterr().err
    assert main([*argv, "--no-progress"]) == 0
    assert "meta-evaluate:" not in capsys.readouterr().err


def test_meta_evaluate_refuses_a_run_of_another_kind_naming_it(meta_run, tmp_path):
    _, model, _, out = meta_run
    single = tmp_path / "single"
    single.mkdir()
    (single / "run_config.json").write_text("{}")  # what blob-lora train writes
    with pytest.raises(ConfigError, match="is a single-task run of 'blob-lora train'"):
        meta_evaluate(single)
    no_adapter = tmp_path / "no-adapter"  # a finished protocol but no ABMLL adapter
    no_adapter.mkdir()
    shutil.copy(out / "meta_config.json", no_adapter)
    shutil.copy(out / "tasks.json", no_adapter)
    with pytest.raises(ConfigError, match=r"holds no ABMLL adapter \(adapter/abmll_config.json\)"):
        meta_evaluate(no_adapter, baseline="lora-support")
    with pytest.raises(ConfigError, match="is not a meta-learning run folder"):
        meta_evaluate(model)
    assert not list(tmp_path.rglob("meta_eval*.json"))


def test_train_refuses_a_meta_learned_method_and_points_to_meta_train(tmp_path, capsys):
    args = ["train", "--method", "abmll", "--task", "arc_easy", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--method abmll learns from a collection of tasks" in err
    assert "blob-lora meta-train --tasks" in err and "meta-evaluate" in err
    assert not (tmp_path / "r").exists()


def test_a_loaded_run_is_recognised_as_abmll(meta_run):
    _, model, _, out = meta_run
    base, _ = load_model_and_tokenizer(str(model))
    assert method_of(load_abmll_model(base, out / "adapter")).name == "abmll"


def test_baselines_run_through_the_same_protocol(meta_run):
    root, _, _, out = meta_run
    runs = {}
    for name in ("zero-shot", "lora-support", "lora-support"):
        assert main(["meta-evaluate", "--run", str(out), "--out", str(root / name),
                     "--baseline", name]) == 0  # fmt: skip
        result = json.loads((root / name / f"meta_eval_{name}.json").read_text())
        assert result["method"] == name and result["eval_samples"] == 0
        assert result["adaptation"] == {"steps": 2, "lr": 1e-2}
        runs.setdefault(name, []).append(result)
    held_out = json.loads((out / "tasks.json").read_text())["meta_test"]
    for results in runs.values():
        assert list(results[0]["tasks"]) == held_out
        assert all(m["n_examples"] == 7 for m in results[0]["tasks"].values())
    assert timeless(runs["lora-support"][0]) == timeless(runs["lora-support"][1])  # deterministic
    # the support-set fit moved the predictive away from the pretrained model's
    zero, fitted = runs["zero-shot"][0]["mean"], runs["lora-support"][0]["mean"]
    assert zero["nll"] != fitted["nll"]


def test_a_config_file_cannot_set_what_the_command_line_chooses(meta_run, tmp_path, capsys):
    """``overwrite: true`` in a config file would be dropped silently (the flag's False wins):
    it is refused, and the old run is left alone."""
    _, model, tasks, out = meta_run
    before = sorted(p.name for p in out.iterdir())
    config = tmp_path / "meta.yaml"
    config.write_text("overwrite: true\nk_shot: 3\n")
    assert main([*train_args(tasks, model, out), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite: command-line only, not a config-file key" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_question_that_cannot_fit_stops_the_run_first_or_is_left_out(tmp_path, capsys):
    """Three tasks hold a question whose options alone exceed --max-length: by default
    meta-train stops before anything is written, naming them and the length that fits; with
    --overlong drop they are left out of their pools, listed in tasks.json, and the held-out
    ones are neither scored nor drawn as support by meta-evaluate (listed there too)."""
    model = tiny_model_folder(tmp_path / "model")
    tasks = tiny_task_collection(tmp_path / "tasks", n_tasks=4, n_questions=10)
    for t in (0, 1, 3):  # 2 of the 4 are held out: at least one of them holds one, and so
        path = tasks / f"task{t}" / "validation.jsonl"  # does the meta-train side
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[4]["choices"] = [f"{c} is a very long option indeed" * 2 for c in "abc"]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(train_args(tasks, model, out)) == 2
    err = capsys.readouterr().err
    assert "3 question(s) of 3 task(s) cannot fit --max-length 96" in err
    # the example question is named with its file and line (the fifth row)
    assert re.search(r"task(\d) \(\S*task\1/validation\.jsonl, line 5\) needs \d+ tokens", err)
    assert "--overlong drop leaves them out" in err
    fits = int(re.search(r"--max-length (\d+) fits them all", err).group(1))
    assert not out.exists()

    assert main(train_args(tasks, model, out, "--overlong", "drop")) == 0
    summary = json.loads((out / "tasks.json").read_text())
    assert summary["overlong"] == {
        str(tasks / f"task{t}"): {f"t{t}q4": fits} for t in (0, 1, 3)
    }  # the same options in each, so the same length
    assert fits > 96
    assert main(["meta-evaluate", "--run", str(out), "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "meta_eval.json").read_text())
    held_out = summary["meta_test"]
    dropped = {name: summary["overlong"][name] for name in held_out if name in summary["overlong"]}
    assert dropped and result["overlong"] == dropped
    for name, metrics in result["tasks"].items():
        assert metrics["n_examples"] == (6 if name in dropped else 7)  # 10 - 3 support (- 1)


def test_cloze_length_normalisation_is_a_setting_of_the_run(tmp_path) -> None:
    """``--length-norm`` as ``train`` has it: stored with the run, and the inputs meta-evaluate
    re-creates divide each option's score by its scored characters."""
    from blob_lora.pipeline.meta_evaluate import open_run

    model = tiny_model_folder(tmp_path / "model")
    tasks = tiny_task_collection(tmp_path / "tasks", n_tasks=4, n_questions=10)
    out = tmp_path / "run"
    argv = train_args(tasks, model, out, "--scoring", "cloze", "--length-norm", "char")
    assert main(argv) == 0
    assert json.loads((out / "meta_config.json").read_text())["length_norm"] == "char"
    run, _ = open_run(out)
    assert run.inputs.scoring.length_norm == "char"
    pool = run.split.test[0]
    (batch,) = run.inputs.batches(pool, pool.examples[:3])
    chars = [[len(" " + c) for c in ("red", "blue", "green")]] * 3  # each option's scored text
    assert batch["divisor"].tolist() == chars


def test_meta_evaluate_never_replaces_another_evaluation_without_overwrite(meta_run, tmp_path):
    root, _, _, out = meta_run
    shared = tmp_path / "shared"
    first = meta_evaluate(out, shared, baseline="zero-shot", progress=False)
    assert isinstance(first["evaluation_key"], str)
    path = shared / "meta_eval_zero-shot.json"
    # the same evaluation again: scored afresh, the same numbers
    again = meta_evaluate(out, shared, baseline="zero-shot", progress=False)
    assert timeless(again) == timeless(first)
    # another evaluation (here another protocol: a copy of the run with another seed)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    cfg = json.loads((other / "meta_config.json").read_text())
    (other / "meta_config.json").write_text(json.dumps({**cfg, "seed": 2}))
    with pytest.raises(ConfigError, match="already holds another evaluation"):
        meta_evaluate(other, shared, baseline="zero-shot", progress=False)
    assert json.loads(path.read_text()) == again
    replaced = meta_evaluate(other, shared, baseline="zero-shot", progress=False, overwrite=True)
    assert replaced["seed"] == 2 and replaced["evaluation_key"] != first["evaluation_key"]
    # a file without a key (written by hand, or before keys were recorded): refused before loads
    path.write_text("{}")
    with pytest.raises(ConfigError, match="not known to be this evaluation's"):
        meta_evaluate(out, shared, baseline="zero-shot", progress=False)
    with pytest.raises(ConfigError, match="--eval-samples must be an integer >= 0, got -3"):
        meta_evaluate(out, tmp_path / "neg", eval_samples=-3)


def test_one_task_twice_is_refused_and_other_data_are_not_scored(meta_run, tmp_path, monkeypatch):
    from blob_lora.tasks.collection import collection_names

    root, model, _, _ = meta_run
    monkeypatch.chdir(root)
    for spec in ("tasks/task0,./tasks/task0/,tasks/task1", "tasks/task1,tasks/task1/,tasks/task2"):
        with pytest.raises(ConfigError, match="names a task twice"):
            collection_names(spec)
    rel = tmp_path / "rel"  # a collection given by a relative path, as most users type it
    assert main([*train_args("tasks", model, rel), "--meta-steps", "1"]) == 0
    assert set(json.loads((rel / "tasks.json").read_text())["task_data"]) == {
        f"tasks/task{i}" for i in range(4)
    }
    # evaluated from a folder whose own tasks/ holds other questions: refused, naming them
    elsewhere = tmp_path / "elsewhere"
    tiny_task_collection(elsewhere / "tasks", n_tasks=4, n_questions=12)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError, match="differ from those .* was meta-trained on"):
        meta_evaluate(rel, tmp_path / "e", baseline="zero-shot", progress=False)
    monkeypatch.chdir(root)  # from its own folder it evaluates
    assert meta_evaluate(rel, tmp_path / "e", baseline="zero-shot", progress=False)["tasks"]


def test_a_relative_model_folder_read_from_elsewhere_names_the_folder_to_run_from(
    meta_run, tmp_path, monkeypatch
):
    """A run meta-trained with ``--model model`` (a folder next to it) and evaluated from
    another folder reads ``model`` as a Hub name there: the error says where to run from."""
    root, _, tasks, _ = meta_run
    monkeypatch.chdir(root)
    run = tmp_path / "relmodel"
    assert main([*train_args(tasks, "model", run), "--meta-steps", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # "model" as a Hub name fails at once
    with pytest.raises(ConfigError, match="run meta-evaluate from the folder meta-train ran in"):
        meta_evaluate(run, tmp_path / "e", baseline="zero-shot", progress=False)
    # a folder of that name here that does not load: its own error, no hint to move
    (tmp_path / "model").mkdir()
    with pytest.raises(Exception) as refused:
        meta_evaluate(run, tmp_path / "e", baseline="zero-shot", progress=False)
    assert "meta-train ran in" not in str(refused.value)
    monkeypatch.chdir(root)  # from its own folder it evaluates
    assert meta_evaluate(run, tmp_path / "e", baseline="zero-shot", progress=False)["tasks"]


def test_settings_the_run_cannot_honour_are_noted_before_step_one(meta_run, tmp_path, capsys):
    _, model, tasks, _ = meta_run
    argv = train_args(tasks, model, tmp_path / "r", "--meta-batch-tasks", "5")
    argv[argv.index("--query-size") + 1] = "9"
    argv[argv.index("--meta-steps") + 1] = "1"
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "--meta-batch-tasks 5 but only 2 meta-train task(s)" in err
    assert "--query-size 9 but" in err
    assert re.search(r"task\d 7", err)


def test_a_question_its_scoring_cannot_read_names_its_file_and_line(tmp_path):
    """The check before meta-training meets every question; one that cloze scoring cannot
    read (a WinoGrande sentence without its blank) stops it naming the file and line, which a
    pool now keeps the split of."""
    from blob_lora.pipeline.meta_config import MetaConfig
    from blob_lora.pipeline.meta_data import MetaSplit, TaskInputsFactory, fit_split
    from blob_lora.tasks import Scoring
    from blob_lora.tasks.collection import load_pool
    from tests.factories import tiny_tokenizer

    folder = tmp_path / "winogrande"
    folder.mkdir()
    row = {"sentence": "A _ fell.", "option1": "cup", "option2": "pot", "answer": "1"}
    rows = [row] * 3 + [{**row, "qID": "w4", "sentence": "No blank."}]
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pools = [load_pool(n, data_root=tmp_path) for n in ("winogrande_s", "winogrande_m")]
    assert pools[0].split == "eval"
    inputs = TaskInputsFactory(tiny_tokenizer(), 256, 2, Scoring.of("cloze"), torch.device("cpu"))
    with pytest.raises(DataError, match="'w4': a WinoGrande sentence needs exactly") as err:
        fit_split(MetaSplit(pools[:1], pools[1:]), inputs, MetaConfig())
    assert str(err.value).endswith(f"({folder / 'validation.jsonl'}, line 4)")
