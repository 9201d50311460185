"""The prediction API and ``blob-lora predict``: rows, decomposition identities, files, errors."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from pathlib import Path

import pytest
from peft import get_peft_model

from blob_lora.cli.main import main
from blob_lora.prediction import EarlyStop, Predictor, predict, read_questions
from blob_lora.utils.errors import ConfigError, DataError
from tests.factories import TARGETS, tiny_llama
from tests.prediction.conftest import blob_model


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


@pytest.mark.parametrize("mode", ["fold", "prefix", "early", "prefix-early"])
def test_rows_and_decomposition_identities(tokenizer, records, mode):
    rows = predict(
        blob_model(), tokenizer, records, n_samples=6, mode=mode, seed=0, max_length=64,
        early=EarlyStop(tol=0.0, min_samples=2, group_size=2),
    )  # fmt: skip
    assert [r["id"] for r in rows] == ["q1", "2", "q3", "7"]
    for rec, row in zip(records, rows, strict=True):
        k = len(rec["choices"])
        assert len(row["probs"]) == k and math.isclose(sum(row["probs"]), 1.0, abs_tol=1e-6)
        assert row["pred"] == max(range(k), key=lambda i: row["probs"][i])
        assert row["answer"] == "ABCD"[row["pred"]]
        assert row["answer_text"] == rec["choices"][row["pred"]]
        assert row["confidence"] == row["probs"][row["pred"]]
        assert row["n_samples"] == 6
        # total = entropy of the averaged predictive = aleatoric + epistemic, parts >= 0
        assert math.isclose(row["total"], entropy(row["probs"]), abs_tol=1e-9)
        assert math.isclose(row["total"], row["aleatoric"] + row["epistemic"], abs_tol=1e-12)
        assert row["aleatoric"] >= 0 and row["epistemic"] > 1e-4
        assert row["total"] <= math.log(k) + 1e-9
    labelled = {r["id"]: r for r in rows if "label" in r}
    assert set(labelled) == {"q1", "2"} and labelled["2"]["label"] == 0
    assert labelled["q1"]["correct"] == (labelled["q1"]["pred"] == 0)


def test_prefix_mode_rows_equal_fold_rows_with_same_seed(tokenizer, records):
    model = blob_model(bayesian_blocks=1)
    fold = predict(model, tokenizer, records, n_samples=5, seed=3, max_length=64)
    prefix = predict(model, tokenizer, records, n_samples=5, seed=3, mode="prefix", max_length=64)
    for a, b in zip(fold, prefix, strict=True):
        assert a["pred"] == b["pred"]
        for key in ("total", "aleatoric", "epistemic", "confidence"):
            assert math.isclose(a[key], b[key], abs_tol=1e-6)


def test_methods_without_samples_report_total_only(tokenizer, records):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    lora = get_peft_model(tiny_llama(0), cfg).eval()
    predictor = Predictor(lora, tokenizer, max_length=64)  # method inferred: plain LoRA
    rows = predictor.predict(records)
    assert predictor.method.name == "lora" and predictor.last_summary.mode == "mean"
    for row in rows:
        assert row["aleatoric"] is None and row["epistemic"] is None and row["n_samples"] == 0
        assert math.isclose(row["total"], entropy(row["probs"]), abs_tol=1e-9)
    # BLoB with N = 0 (mean weights) is deterministic and equally reports total only
    model = blob_model()
    a = predict(model, tokenizer, records, n_samples=0, seed=1, max_length=64)
    b = predict(model, tokenizer, records, mode="mean", seed=2, max_length=64)
    assert [r["probs"] for r in a] == [r["probs"] for r in b]
    assert all(r["epistemic"] is None for r in a)


def test_bad_records_name_the_record(tokenizer):
    with pytest.raises(DataError, match="record 2: missing field 'choices'"):
        predict(
            blob_model(), tokenizer, [{"question": "a", "choices": ["x", "y"]}, {"question": "b"}]
        )
    with pytest.raises(DataError, match="no questions"):
        predict(blob_model(), tokenizer, [])


def test_read_questions_from_jsonl(tmp_path, records):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    q = read_questions(path)
    assert [ex.id for ex in q.examples] == ["q1", "line-2", "q3", "7"]
    assert q.labels == [0, 0, None, None] and q.task.n_options == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: needs at least 2 options"):
        read_questions(bad)
    # the answer is optional here, so a misspelled one would otherwise vanish with no word
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answr": 1}\n')
    with pytest.raises(DataError, match=r"line 1: field 'answr' .* did you mean 'answer'"):
        read_questions(bad)


def test_a_question_too_long_to_fit_names_its_file_and_line(tmp_path, tokenizer, records):
    """Found when the questions are tokenised, after the file was read: the error named only
    the question's id, which a user with ids of their own has to search the file for."""
    path = tmp_path / "q.jsonl"
    long = {"id": "big", "question": "Q?", "choices": ["word " * 80, "b"]}
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(long) + "\n")
    with pytest.raises(DataError, match=r"example 'big'") as err:
        Predictor(blob_model(), tokenizer, max_length=64).predict_file(path, tmp_path / "o.jsonl")
    assert str(err.value).endswith(f"({path}, line 3)")  # the blank line 2 counts
    assert not (tmp_path / "o.jsonl").exists()
    # piped in: the same, named <stdin>
    piped = read_questions("-", stdin=io.BytesIO(path.read_bytes()))
    with pytest.raises(DataError, match=r"example 'big'") as err:
        Predictor(blob_model(), tokenizer, max_length=64).predict(piped)
    assert str(err.value).endswith("(<stdin>, line 3)")
    # records handed over in memory have no file: the error names the id alone, as before
    with pytest.raises(DataError, match=r"example 'big': .*max_length=64$"):
        predict(blob_model(), tokenizer, [long], max_length=64)


def test_cli_predict_writes_rows_atomically(run_dir, tmp_path, records, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "out" / "pred.jsonl"
    argv = ["predict", "--run", str(run_dir), "--input", str(inp), "--out", str(out)]
    assert main([*argv, "--mode", "prefix-early", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "line-2", "q3", "7"]
    assert all(2 <= r["n_samples"] <= 4 and r["epistemic"] is not None for r in rows)
    printed = capsys.readouterr().out
    assert "4 questions" in printed and "mode prefix-early, N=4" in printed
    assert "accuracy on the 2 labelled" in printed
    assert not list(out.parent.glob(".*"))  # no temporary files left behind
    # same seed, fold mode, N from the command line: reproducible, same answers as prefix
    assert main([*argv, "--mode", "mean", "--no-progress", "--overwrite"]) == 0
    mean_rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["n_samples"] == 0 and r["epistemic"] is None for r in mean_rows)


def test_cli_predict_reads_standard_input(run_dir, tmp_path, records, monkeypatch):
    """``--input -``: the same rows as from a file (ids by line number, the same samples), and
    an error in a piped row names ``<stdin>`` and the line."""
    lines = "\n".join(json.dumps(r) for r in records) + "\n"
    inp = tmp_path / "in.jsonl"
    inp.write_text(lines)
    argv = ["predict", "--run", str(run_dir), "--mode", "mean", "--no-progress"]
    assert main([*argv, "--input", str(inp), "--out", str(tmp_path / "file.jsonl")]) == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    assert main([*argv, "--input", "-", "--out", str(tmp_path / "piped.jsonl")]) == 0
    piped = (tmp_path / "piped.jsonl").read_text()
    assert piped == (tmp_path / "file.jsonl").read_text() and '"id": "line-2"' in piped
    bad = io.BytesIO(lines.encode() + b'{"question": "q", "choices": ["a"]}\n')
    with pytest.raises(DataError, match=r"^<stdin>, line 5: needs at least 2 options"):
        read_questions("-", stdin=bad)
    with pytest.raises(DataError, match="<stdin> holds no questions"):
        read_questions("-", stdin=io.BytesIO(b"\n"))


def test_cli_predict_writes_rows_to_standard_output(run_dir, tmp_path, records, capsys):
    """``--out -``: the very rows of a file on standard output, alone (its summary line goes
    to standard error), and no file named ``-``; ``--overwrite`` with it is refused."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    argv = ["predict", "--run", str(run_dir), "--input", str(inp), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "file.jsonl")]) == 0
    capsys.readouterr()
    assert main([*argv, "--out", "-"]) == 0
    printed = capsys.readouterr()
    assert printed.out == (tmp_path / "file.jsonl").read_text()
    assert "4 questions -> standard output" in printed.err
    assert not Path("-").exists() and not (tmp_path / "-").exists()
    assert main([*argv, "--out", "-", "--overwrite"]) == 2
    assert "'--out -' writes to standard output" in capsys.readouterr().err


def test_cli_predict_input_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    code = main(["predict", "--run", str(run_dir), "--input", str(tmp_path / "no.jsonl"),
                 "--out", str(out)])  # fmt: skip
    assert code == 2 and "input file" in capsys.readouterr().err
    assert not out.exists()


def test_an_existing_output_is_refused_before_any_question_is_scored(run_dir, tmp_path, records):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    kept = tmp_path / "kept.jsonl"
    kept.write_text("precious\n")
    argv = ["predict", "--run", str(run_dir), "--input", str(inp), "--no-progress"]
    assert main([*argv, "--out", str(kept)]) == 2
    assert kept.read_text() == "precious\n"
    # the questions' own file: refused even with --overwrite
    assert main([*argv, "--out", str(inp), "--overwrite"]) == 2
    assert json.loads(inp.read_text().splitlines()[0]) == records[0]
    # a file where a folder of --out should be: a clear error, not a traceback after scoring
    assert main([*argv, "--out", str(kept / "o.jsonl")]) == 2
    # a FIFO (as a device, /dev/stdout): the atomic rename would replace it, so refused
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main([*argv, "--out", str(fifo), "--overwrite"]) == 2
    assert fifo.is_fifo()
    # the Python API refuses the same, before scoring
    predictor = Predictor.from_run(run_dir)
    for out, kwargs in ((kept, {}), (inp, {"overwrite": True})):
        with pytest.raises(ConfigError):
            predictor.predict_file(inp, out, **kwargs)
        assert predictor.last_summary is None
    assert kept.read_text() == "precious\n" and json.loads(inp.read_text().splitlines()[0])
    summary = predictor.predict_file(inp, kept, overwrite=True)
    assert summary.n_examples == 4 and len(kept.read_text().splitlines()) == 4


def test_a_gz_output_is_compressed_and_notes_say_what_ran(run_dir, tmp_path, records, capsys):
    inp = tmp_path / "in.jsonl"
    long = {"question": "Why? " * 60, "choices": ["a", "b"], "context": "Text. " * 80}
    inp.write_text("\n".join(json.dumps(r) for r in [*records, long]) + "\n")
    out = tmp_path / "o.jsonl.gz"
    argv = ["predict", "--run", str(run_dir), "--input", str(inp), "--out", str(out)]
    assert main([*argv, "--no-progress", "--mode", "prefix", "--eval-samples", "0"]) == 0
    rows = [json.loads(line) for line in gzip.decompress(out.read_bytes()).splitlines()]
    assert len(rows) == 5 and all(r["n_samples"] == 0 for r in rows)
    assert [r["truncated"] for r in rows] == [False] * 4 + [True]  # which one was cut
    printed = capsys.readouterr().out
    assert printed.count("N = 0: one pass with the mean weights") == 1  # prefix asked, mean ran
    assert "1 of 5 prompts were longer than --max-length 128" in printed
    # --mode mean with samples or a fold contradicts itself
    assert main([*argv, "--overwrite", "--mode", "mean", "--eval-samples", "3"]) == 2
    assert "(--eval-samples) 3 contradicts it" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--mode", "mean", "--fold", "2"]) == 2
    assert "(--fold) 2 contradicts it" in capsys.readouterr().err


def test_ensemble_notes_where_n_differs_from_the_one_asked(tokenizer, records, tmp_path):
    from peft import LoraConfig

    from blob_lora.methods.ensemble import EnsembleMethod

    for k in range(2):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
        get_peft_model(tiny_llama(k), cfg).save_pretrained(tmp_path / f"member-{k}")
    ens = EnsembleMethod().load(tiny_llama(0), tmp_path)
    capped = Predictor(ens, tokenizer, n_samples=5, max_length=64)
    capped.predict(records)
    assert capped.n_samples == 2 and "N = 5 asked, 2 run" in capped.last_summary.note
    for kwargs in ({"n_samples": 0}, {"mode": "mean"}):
        zero = Predictor(ens, tokenizer, max_length=64, **kwargs)
        zero.predict(records)
        assert "no mean weights" in zero.last_summary.note


def test_a_record_without_id_whose_position_is_taken_says_so(tokenizer):
    recs = [
        {"id": 2, "question": "a", "choices": ["x", "y"]},
        {"question": "b", "choices": ["x", "y"]},
    ]
    with pytest.raises(DataError, match="has no id, and the one it is given by position, '2'"):
        predict(blob_model(), tokenizer, recs)


def test_a_model_with_lora_dropout_and_no_method_is_predicted_as_lora_with_a_warning(
    tokenizer, records
):
    """An MC-dropout model carries nothing that a LoRA model trained with dropout does not:
    without a method it is predicted as plain LoRA, and the user is told how to get samples."""
    import warnings

    from peft import LoraConfig

    def peft_model(dropout: float):
        cfg = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM"
        )
        return get_peft_model(tiny_llama(0), cfg).eval()

    with pytest.warns(UserWarning, match="method='mc-dropout'") as told:
        inferred = Predictor(peft_model(0.1), tokenizer, max_length=64)
    assert inferred.method.name == "lora"
    assert [w.filename for w in told if "mc-dropout" in str(w.message)] == [__file__]
    with pytest.warns(UserWarning, match="method='mc-dropout'") as told:
        rows = predict(peft_model(0.1), tokenizer, records, max_length=64)  # one frame deeper
    assert len(rows) == len(records)
    assert [w.filename for w in told if "mc-dropout" in str(w.message)] == [__file__]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mc = Predictor(peft_model(0.1), tokenizer, method="mc-dropout", n_samples=3, max_length=64)
        assert mc.predict(records)[0]["n_samples"] == 3
        assert Predictor(peft_model(0.0), tokenizer, max_length=64).method.name == "lora"
    assert not [w for w in caught if "mc-dropout" in str(w.message)]


def test_a_mode_that_falls_back_warns_at_the_callers_line(tokenizer, records):
    """``Predictor(mode=...)`` reaches ``resolve_mode`` several frames down: the warning
    names the caller's file, where a fixed stacklevel named one of ours."""
    with pytest.warns(UserWarning, match="runs as 'mean'") as told:
        rows = predict(blob_model(), tokenizer, records, n_samples=0, mode="prefix", max_length=64)
    assert rows and all(r["n_samples"] == 0 for r in rows)
    assert [w.filename for w in told if "runs as" in str(w.message)] == [__file__]


def test_an_input_that_is_a_folder_is_named_as_one(tmp_path):
    """``--input <folder>`` said "not found" of a path that exists."""
    with pytest.raises(DataError, match="is a folder; give a JSONL file"):
        read_questions(tmp_path)
    with pytest.raises(DataError, match="input file .* not found"):
        read_questions(tmp_path / "absent.jsonl")


def test_samples_asked_of_a_deterministic_method_are_noted(tokenizer, records):
    """``--eval-samples 4`` on a LoRA run ran one pass without a word (``--mode prefix`` on it
    said so); now the summary's note says it, and nothing is said where N was not asked."""
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    lora = get_peft_model(tiny_llama(0), cfg).eval()
    asked = Predictor(lora, tokenizer, "lora", n_samples=4, max_length=64)
    rows = asked.predict(records)
    assert asked.n_samples == 0 and all(r["n_samples"] == 0 for r in rows)
    assert "N = 4 asked, one deterministic pass run: method 'lora'" in asked.last_summary.note
    plain = Predictor(lora, tokenizer, "lora", max_length=64)
    plain.predict(records)
    assert "asked" not in plain.last_summary.note
