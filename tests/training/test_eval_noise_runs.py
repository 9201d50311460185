"""``--eval-noise`` (issue 21.5) as a run setting and as an override of evaluate/predict."""

from __future__ import annotations

import json

import pytest

import blob_lora
from blob_lora.cli.main import main
from blob_lora.pipeline import train
from blob_lora.prediction import Predictor
from blob_lora.training import TrainConfig
from blob_lora.training.run_dir import RUN_CONFIG, check_run_dir
from blob_lora.training.saved_run import read_run_config
from tests.training.test_train_loop import tiny_cfg

QUESTIONS = [
    {"question": "Which is a colour?", "choices": ["red", "dog", "seven"], "answer": 0},
    {"question": "Which is a number?", "choices": ["cat", "five"], "answer": 1},
]


def _metrics(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_eval_noise_from_train_to_evaluate_and_predict(
    tmp_path, data_root, tiny_model_dir, noise_spy, capsys
) -> None:
    cfg = tiny_cfg(
        tmp_path, data_root, tiny_model_dir, method="blob", max_steps=2, eval_noise="token"
    )
    summary = train(cfg, progress=False)
    run = tmp_path / "run"
    assert json.loads((run / RUN_CONFIG).read_text())["eval_noise"] == "token"
    assert summary["evaluations"]["arc_easy"]["eval_noise"] == "token"
    assert "independent-token" in noise_spy and "independent" not in noise_spy

    def evaluate(out: str, *flags: str) -> dict:
        noise_spy.clear()
        argv = ["evaluate", "--run", str(run), "--split", "validation[:4]", "--out"]
        assert main([*argv, str(tmp_path / out), "--no-progress", *flags]) == 0
        return _metrics(tmp_path / out)

    assert evaluate("ev-run")["eval_noise"] == "token"  # the run's setting by default
    assert set(noise_spy) == {"independent-token"}
    assert evaluate("ev-seq", "--eval-noise", "sequence")["eval_noise"] == "sequence"
    assert set(noise_spy) == {"independent"}
    assert evaluate("ev-mean", "--eval-samples", "0").get("eval_noise") is None  # no samples

    noise_spy.clear()
    api = blob_lora.evaluate(
        run, split="validation[:4]", eval_noise="sequence", out=tmp_path / "api"
    )
    assert api["eval_noise"] == "sequence" and set(noise_spy) == {"independent"}

    assert Predictor.from_run(run).eval_noise == "token"
    assert Predictor.from_run(run, eval_noise="sequence").eval_noise == "sequence"
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    for flag, mode in (("token", "independent-token"), ("sequence", "independent")):
        noise_spy.clear()
        out = tmp_path / f"pred-{flag}.jsonl"
        argv = ["predict", "--run", str(run), "--input", str(questions), "--out", str(out)]
        assert main([*argv, "--eval-noise", flag, "--eval-samples", "3", "--no-progress"]) == 0
        assert set(noise_spy) == {mode}
        assert len(out.read_text().splitlines()) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # argparse: a usage error naming the choices
        main(["evaluate", "--run", str(run), "--eval-noise", "layer"])
    assert exc.value.code == 2
    assert "--eval-noise" in capsys.readouterr().err


def test_eval_noise_is_refused_when_unknown_and_ignored_by_plain_lora(
    tmp_path, data_root, tiny_model_dir
) -> None:
    with pytest.raises(Exception, match="--eval-noise"):
        TrainConfig(eval_noise="layer")
    cfg = tiny_cfg(
        tmp_path, data_root, tiny_model_dir, method="lora", max_steps=1, eval_noise="token"
    )
    summary = train(cfg, progress=False)
    assert "eval_noise" not in summary["evaluations"]["arc_easy"]  # no weight samples


def test_a_run_written_before_eval_noise_existed_reads_as_sequence(tmp_path) -> None:
    cfg = TrainConfig(out=str(tmp_path / "old"))
    old = {k: v for k, v in cfg.to_dict().items() if k != "eval_noise"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / RUN_CONFIG).write_text(json.dumps(old))
    assert read_run_config(tmp_path / "old").blob.eval_noise == "sequence"
    assert check_run_dir(tmp_path / "old", cfg.to_dict(), overwrite=False, resume=True)
    # how the run is scored after training may change on resume (compare resumes an
    # interrupted run under an edited file); what it learns may not
    for changed in ({"eval_noise": "token"}, {"eval_samples": 3}, {"eval_split": "x[:2]"}):
        settings = TrainConfig(out=str(tmp_path / "old"), **changed).to_dict()
        assert check_run_dir(tmp_path / "old", settings, overwrite=False, resume=True)
    learned = TrainConfig(out=str(tmp_path / "old"), lr=0.5).to_dict()
    with pytest.raises(Exception, match=r"settings differ from the interrupted run: lr"):
        check_run_dir(tmp_path / "old", learned, overwrite=False, resume=True)
