"""Re-scoring a finished run (``blob-lora evaluate`` and ``blob_lora.evaluate``, one shared
path): an earlier evaluation is never written over without ``overwrite``, the API checks its
numbers and takes the command line's settings."""

from __future__ import annotations

import json

import pytest

import blob_lora
from blob_lora.cli.main import main
from blob_lora.pipeline import train
from blob_lora.prediction import Predictor
from blob_lora.tasks import Scoring
from blob_lora.utils.errors import ConfigError, DataError
from tests.training.test_train_loop import tiny_cfg

QUESTIONS = [
    {"question": "Which is a colour?", "choices": ["red", "dog", "seven"], "answer": 0},
    {"question": "Which is a number?", "choices": ["cat", "five"], "answer": 1},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root, tiny_model_dir):
    """A BLoB run evaluated at the end of training (RUN/eval/arc_easy)."""
    tmp = tmp_path_factory.mktemp("evaluate_saved")
    train(tiny_cfg(tmp, data_root, tiny_model_dir, method="blob", max_steps=2), progress=False)
    return tmp / "run"


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_end_of_training_evaluation_is_kept_unless_overwritten(run, tmp_path, capsys) -> None:
    own = run / "eval" / "arc_easy"
    before = _files(own)
    summary = json.loads((run / "summary.json").read_text())["evaluations"]["arc_easy"]
    assert json.loads(before["metrics.json"])["nll"] == summary["nll"]
    with pytest.raises(ConfigError, match="already holds another evaluation"):
        blob_lora.evaluate(run, split="validation[:4]", n_samples=2)
    argv = ["evaluate", "--run", str(run), "--split", "validation[:4]", "--no-progress"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _files(own) == before  # nothing written over, the plots included
    # several tasks: the free folder is scored, the taken one refused (and kept)
    argv = ["evaluate", "--run", str(run), "--task", "openbookqa,arc_easy", "--no-progress"]
    assert main([*argv, "--split", "validation[:4]"]) == 2
    assert (run / "eval" / "openbookqa" / "metrics.json").exists()
    assert _files(own) == before
    metrics = blob_lora.evaluate(run, split="validation[:4]", n_samples=2, overwrite=True)
    assert metrics["n_examples"] == 4 and metrics["eval_samples"] == 2
    assert json.loads((own / "metrics.json").read_text())["n_examples"] == 4
    # a new folder is free, and the same call gives the same numbers there (seeded)
    again = blob_lora.evaluate(run, split="validation[:4]", n_samples=2, out=tmp_path / "b")
    assert again["nll"] == metrics["nll"]


def test_the_api_checks_its_numbers_and_takes_the_clis_settings(run, tmp_path) -> None:
    bad = [
        ({"n_samples": -1}, "n_samples"),
        ({"n_samples": 2.5}, "n_samples"),
        ({"n_samples": "3"}, "n_samples"),
        ({"seed": "1"}, "seed"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 0}, "max_length"),
        ({"scoring": 3}, "scoring"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ConfigError, match=match):
            blob_lora.evaluate(run, out=tmp_path / "never", **kwargs)
    assert not (tmp_path / "never").exists()
    kw = {"split": "validation[:4]", "n_samples": 2}
    named = blob_lora.evaluate(run, scoring="letter", out=tmp_path / "named", **kw)
    spec = blob_lora.evaluate(run, scoring=Scoring("letter"), out=tmp_path / "spec", **kw)
    assert named["nll"] == spec["nll"]
    # the CLI's other settings: on the mean weights batch and fold change no number; a prompt
    # budget too small for the options is refused, so max_length is read
    mean = {"split": "validation[:4]", "n_samples": 0}
    plain = blob_lora.evaluate(run, out=tmp_path / "plain", **mean)
    folded = blob_lora.evaluate(run, batch_size=1, fold=1, out=tmp_path / "folded", **mean)
    assert folded["nll"] == pytest.approx(plain["nll"], rel=1e-5)
    with pytest.raises(DataError):
        blob_lora.evaluate(run, max_length=8, out=tmp_path / "short", **mean)
    model = json.loads((run / "run_config.json").read_text())["model"]
    moved = blob_lora.evaluate(run, model=model, out=tmp_path / "model", **kw)
    assert moved["nll"] == spec["nll"]


def test_load_run_and_predictor_take_plain_strings_and_are_reproducible(run) -> None:
    loaded = blob_lora.load_run(str(run))
    assert loaded.config.method == "blob"
    predictor = Predictor.from_run(str(run), n_samples=3)
    first, second = predictor.predict(QUESTIONS), predictor.predict(QUESTIONS)
    assert [r["probs"] for r in first] == [r["probs"] for r in second]  # seeded by default
    unseeded = Predictor.from_run(str(run), n_samples=3, seed=None)
    draws = [unseeded.predict(QUESTIONS)[0]["probs"] for _ in range(2)]
    assert draws[0] != draws[1]  # seed=None: torch's generator as it stands
    assert Predictor.from_run(str(run), scoring="letter").scoring == Scoring("letter")
    with pytest.raises(DataError, match="wrap it in a list"):
        predictor.predict(QUESTIONS[0])


def test_a_base_model_comes_with_its_tokenizer(run, char_base) -> None:
    with pytest.raises(ConfigError, match="base_model was passed without tokenizer"):
        blob_lora.load_run(run, base_model=char_base)
    with pytest.raises(ConfigError, match="base_model was passed without tokenizer"):
        from blob_lora.training.trainer import RunStart

        RunStart(base_model=char_base)


def test_an_adapter_that_does_not_fit_the_named_model_says_how_to_give_another(
    run, tmp_path
) -> None:
    """A run trained on a model passed in Python names the default ``--model``; re-opening it
    on the model it names fails, and the error says how to give the right one."""
    import shutil

    from blob_lora.utils.errors import CheckpointError
    from tests.factories import save_model_folder, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    wide = tiny_llama(0, vocab_size=len(tok), hidden_size=48, pad_token_id=tok.pad_token_id)
    other = save_model_folder(tmp_path / "wide", wide, tok)
    copy = shutil.copytree(run, tmp_path / "copy")
    stored = json.loads((copy / "run_config.json").read_text())
    (copy / "run_config.json").write_text(json.dumps({**stored, "model": str(other)}))
    with pytest.raises(CheckpointError, match="--model / model="):
        blob_lora.load_run(copy)


def test_the_same_evaluation_made_again_returns_the_finished_one(
    run, tmp_path, monkeypatch
) -> None:
    """A stopped multi-task evaluation is re-run as it was: the tasks it finished are not
    scored again (their metrics come back as written), the one it stopped in goes on, and a
    change of settings is refused instead of taken for the same evaluation."""
    import blob_lora.evaluation.evaluate as evaluation

    out = tmp_path / "multi"
    argv = ["evaluate", "--run", str(run), "--task", "arc_easy,openbookqa", "--out", str(out)]
    argv += ["--split", "validation[:4]", "--eval-samples", "2", "--no-progress"]
    assert main(argv) == 0
    first = {t: _files(out / t) for t in ("arc_easy", "openbookqa")}
    (out / "openbookqa" / "metrics.json").unlink()  # as if stopped during the second task
    passes = []
    real = evaluation._score_split
    monkeypatch.setattr(
        evaluation, "_score_split", lambda *a, **k: passes.append(1) or real(*a, **k)
    )
    assert main(argv) == 0
    assert len(passes) == 1  # only the unfinished task was scored
    assert _files(out / "arc_easy") == first["arc_easy"]
    again = json.loads((out / "openbookqa" / "metrics.json").read_text())
    assert again["nll"] == json.loads(first["openbookqa"]["metrics.json"])["nll"]
    assert main([*argv[:-2], "3", "--no-progress"]) == 2  # N = 3 is another evaluation
    assert _files(out / "arc_easy") == first["arc_easy"]


def test_the_api_hands_every_setting_on(run, tmp_path, monkeypatch) -> None:
    """What the API is given reaches the scoring pass (not only the defaults' numbers)."""
    import blob_lora.pipeline.evaluate_saved as evaluate_saved

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs, task=args[3])
        return {}

    monkeypatch.setattr(evaluate_saved, "evaluate_on_task", spy)
    reference = tmp_path / "id"
    blob_lora.evaluate(
        run,
        "openbookqa",
        split="validation[:2]",
        batch_size=3,
        fold=2,
        max_length=64,
        data_root=tmp_path / "data",
        ood_reference=reference,
        n_samples=5,
        seed=7,
        overwrite=True,
        out=tmp_path / "o",
    )
    assert (seen["batch_size"], seen["fold"], seen["max_length"]) == (3, 2, 64)
    assert (seen["n_samples"], seen["seed"], seen["keep_finished"]) == (5, 7, False)
    assert seen["ood_against"] == reference and seen["split"] == "validation[:2]"
    assert seen["task"].name == "openbookqa"


def test_another_base_model_is_used_when_given(run, tmp_path, tiny_model_dir) -> None:
    """``model=`` loads that model (here: other weights of the same shapes, which the run's
    fingerprint tells apart with a warning), not the one the run names."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    kw = {"split": "validation[:4]", "n_samples": 0}
    own = blob_lora.evaluate(run, out=tmp_path / "own", **kw)
    with pytest.warns(UserWarning, match="not the ones"):
        moved = blob_lora.evaluate(run, model=str(other), out=tmp_path / "moved", **kw)
    assert moved["nll"] != own["nll"]


def test_predictor_leaves_the_callers_random_stream_alone(run) -> None:
    import torch

    predictor = Predictor.from_run(run, n_samples=2)
    draws = []
    for _ in range(2):
        torch.manual_seed(123)
        predictor.predict(QUESTIONS)
        draws.append(torch.rand(3))
    torch.manual_seed(123)
    assert torch.equal(draws[0], torch.rand(3)) and torch.equal(draws[0], draws[1])


def test_a_scoring_name_keeps_the_runs_length_normalisation() -> None:
    run_spec = Scoring("cloze", "char")
    assert Scoring.of("cloze", like=run_spec) == run_spec
    assert Scoring.of("letter", like=run_spec) == Scoring("letter")
    assert Scoring.of("cloze") == Scoring("cloze", "none")
