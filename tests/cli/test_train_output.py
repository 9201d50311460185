"""What ``blob-lora train`` prints after a BLoB run: beside the metrics, the range the std of A
ended in, the same numbers summary.json keeps per layer; a LoRA run prints no such line."""

from __future__ import annotations

import json
import warnings

from blob_lora.cli.main import main
from tests.factories import tiny_model_folder


def _train(model, data_root, out, method: str, *extra: str) -> int:
    argv = ["train", "--model", str(model), "--task", "winogrande_s", "--method", method, *extra]
    argv += ["--train-split", "train_s[:8]", "--eval-split", "validation[:2]", "--max-steps", "2"]
    argv += ["--batch-size", "4", "--lr", "0.001", "--target-modules", "q_proj,v_proj"]
    argv += ["--data-root", str(data_root), "--out", str(out), "--no-progress"]
    return main(argv)


def test_a_blob_run_prints_where_the_std_of_a_ended(tmp_path, data_root, capsys) -> None:
    """... and a BLoB setting given to a method that does not read it is named on stderr (it
    changes nothing), never for a method that reads it."""
    model = tiny_model_folder(tmp_path / "model")
    prior = ("--prior-std", "0.2", "--kl-lr", "0.01")
    assert _train(model, data_root, tmp_path / "blob", "blob", *prior) == 0
    printed = capsys.readouterr()
    assert "note:" not in printed.err
    said = printed.out
    std = json.loads((tmp_path / "blob" / "summary.json").read_text())["std_of_A"]
    line = next(x for x in said.splitlines() if x.startswith("std of A:"))
    assert line.startswith(f"std of A: {std['q01']:.4g}-{std['q99']:.4g} over every element of ")
    assert f"of {len(std['layers'])} layers (q01-q99; prior 0.2;" in line
    assert _train(model, data_root, tmp_path / "lora", "lora", *prior) == 0
    printed = capsys.readouterr()
    assert "std of A" not in printed.out
    assert (
        "note: --method lora does not read --kl-lr, --prior-std: they change nothing in this "
        "run" in printed.err
    )


def test_a_run_shows_no_warning_about_the_dependencies_versions(tmp_path, data_root) -> None:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` on every wrap; the
    command's user can do nothing about it, so it is not shown."""
    model = tiny_model_folder(tmp_path / "model")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _train(model, data_root, tmp_path / "lora", "lora") == 0
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]


def test_evaluate_is_reproducible_takes_max_length_and_works_from_elsewhere(
    tmp_path, data_root, capsys, monkeypatch
) -> None:
    """``blob-lora evaluate`` on a BLoB run: the same numbers at every call (seeded), another
    --seed other samples, --max-length read, and a run trained with relative paths evaluated
    from another folder."""
    proj = tmp_path / "proj"
    proj.mkdir()
    tiny_model_folder(proj / "model")
    monkeypatch.chdir(proj)
    assert _train("model", data_root, "runs/blob", "blob") == 0
    monkeypatch.chdir(tmp_path)  # the run stored --model 'model' and --out 'runs/blob'

    def evaluate(name: str, *extra: str) -> list:
        argv = ["evaluate", "--run", "proj/runs/blob", "--eval-samples", "4", "--no-progress"]
        assert main([*argv, "--out", name, *extra]) == 0
        return [json.loads(x)["probs"] for x in open(f"{name}/predictions.jsonl")]

    first, second = evaluate("a"), evaluate("b")
    assert first == second
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["eval_seed"] == 0
    assert evaluate("c", "--seed", "7") != first
    assert evaluate("d", "--max-length", "512") == first  # the prompts fit either way
    capsys.readouterr()
    argv = ["evaluate", "--run", "proj/runs/blob", "--out", "e", "--no-progress"]
    assert main([*argv, "--max-length", "8"]) != 0  # read: the run's own (256) fits them
    assert "more than max_length=8" in capsys.readouterr().err
    assert main([*argv, "--max-length", "0"]) != 0
    assert "--max-length must be >= 1" in capsys.readouterr().err


def test_evaluate_says_when_prompts_were_cut(tmp_path, capsys) -> None:
    """Cut prompts were recorded only in metrics.json: the command now says how many."""
    model = tiny_model_folder(tmp_path / "model")
    task = tmp_path / "mine"
    task.mkdir()
    rows = [
        {"question": f"Which word comes next, {i}?", "choices": ["red", "blue"], "answer": i % 2}
        for i in range(4)
    ]
    rows[0]["context"] = "A long passage about colours. " * 12  # 360 characters: tokens here
    for split in ("train", "validation"):
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model", str(model), "--task", str(task), "--method", "lora"]
    argv += ["--max-steps", "1", "--batch-size", "2", "--target-modules", "q_proj,v_proj"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    said = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["evaluations"]
    (m,) = metrics.values()
    assert m["n_truncated"] == 1  # the run's --max-length (256) cuts the passage
    assert f"note: 1 of 4 prompts of {next(iter(metrics))} were longer than --max-length" in said
    argv = ["evaluate", "--run", str(tmp_path / "run"), "--no-progress", "--max-length", "1024"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert "were longer than --max-length" not in capsys.readouterr().out
