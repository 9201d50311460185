"""A prediction pass stopped part-way goes on from its saved progress with the same result.

The tiny BLoB model draws N weight samples per batch from the global generator, so a resumed
pass that restarted its draws (or skipped no batch, or restored the wrong random state) would
give different probabilities: the tests compare bit for bit against an uninterrupted pass.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from blob_lora.evaluation import evaluate as evaluate_module
from blob_lora.evaluation.evaluate import PROGRESS_FILE, evaluate_on_task
from blob_lora.methods import get_method
from blob_lora.prediction import EarlyStop, predict_dataset
from blob_lora.prediction.resume import PassCheckpoint, pass_key
from blob_lora.tasks import get_task, length_sorted_batches, task_inputs
from blob_lora.utils.fingerprint import model_fingerprint
from tests.prediction.conftest import blob_model

SPLIT = "validation[:7]"  # 3 batches of 3 (the last one short)


class Stop(Exception):
    """Stands for a SIGTERM arriving in the middle of a pass."""


def counting(method, stop_after: int | None = None):
    """``method`` (same name and behaviour) that counts its batches and raises ``Stop`` on the
    batch after ``stop_after``."""

    class Counting(type(method)):
        calls = 0

        def predict_samples(self, model, batch, option_ids, n_samples, fold=None):
            if stop_after is not None and Counting.calls == stop_after:
                raise Stop
            Counting.calls += 1
            return super().predict_samples(model, batch, option_ids, n_samples, fold=fold)

    return Counting()


@pytest.fixture
def inputs(data_root, tokenizer):
    task = get_task("winogrande_s", data_root)
    return task_inputs(task, SPLIT, tokenizer, 96)


def run(model, method, inputs, checkpoint=None, mode="fold"):
    return predict_dataset(
        model, method, inputs.dataset, inputs.collator, inputs.option_ids, 4, 3, mode=mode,
        early=EarlyStop(tol=1.0, min_samples=2), checkpoint=checkpoint,
        batches=length_sorted_batches(inputs.dataset.lengths, 3),
    )  # fmt: skip


def key_of(model, mode="fold"):
    return pass_key(model, {"mode": mode, "n": 4})


@pytest.mark.parametrize("mode", ["fold", "early"])
def test_resumed_pass_equals_uninterrupted(inputs, tmp_path, mode):
    model, method = blob_model(bayesian_blocks=1), get_method("blob")
    torch.manual_seed(0)
    reference = run(model, method, inputs, mode=mode)

    path = tmp_path / "progress.pt"
    torch.manual_seed(0)
    with pytest.raises(Stop):
        run(model, counting(method, stop_after=2), inputs, PassCheckpoint(path, key_of(model, mode), every_seconds=0), mode)  # fmt: skip
    saved = PassCheckpoint(path, key_of(model, mode)).load()
    assert saved is not None and saved.batches == 2 and len(saved.columns["probs"]) == 6

    torch.manual_seed(123)  # another process, another random state: the saved one is restored
    resumed_method = counting(method)
    ckpt = PassCheckpoint(path, key_of(model, mode), every_seconds=0)
    resumed = run(model, resumed_method, inputs, ckpt, mode)
    assert type(resumed_method).calls == 1  # only the batch not scored before the stop
    assert torch.equal(resumed.probs, reference.probs)
    assert torch.equal(resumed.labels, reference.labels)
    assert torch.equal(resumed.n_used, reference.n_used)
    if mode == "fold":
        assert torch.equal(resumed.sample_probs, reference.sample_probs)
    else:  # early stopping drew 2 samples of 4 (tol 1): ragged runs keep no samples
        assert int(resumed.n_used[0]) == 2
    assert torch.equal(resumed.epistemic, reference.epistemic)
    # different samples from another random state: the equality above is not an accident
    torch.manual_seed(123)
    assert not torch.equal(run(model, method, inputs, mode=mode).probs, reference.probs)


def test_progress_of_other_weights_is_not_used(inputs, tmp_path):
    path = tmp_path / "progress.pt"
    first, method = blob_model(bayesian_blocks=1, seed=0), get_method("blob")
    with pytest.raises(Stop):
        run(first, counting(method, stop_after=2), inputs, PassCheckpoint(path, key_of(first), every_seconds=0))  # fmt: skip
    retrained = blob_model(bayesian_blocks=1, seed=1)
    assert model_fingerprint(retrained) != model_fingerprint(first)
    torch.manual_seed(5)
    reference = run(retrained, method, inputs)
    torch.manual_seed(5)
    fresh = counting(method)
    result = run(retrained, fresh, inputs, PassCheckpoint(path, key_of(retrained)))
    assert type(fresh).calls == 3 and torch.equal(result.probs, reference.probs)
    # other settings of the same model: another key
    assert key_of(first) != pass_key(first, {"mode": "fold", "n": 5})


def test_unreadable_progress_is_ignored_with_a_warning(inputs, tmp_path):
    model, method = blob_model(bayesian_blocks=1), get_method("blob")
    path = tmp_path / "progress.pt"
    path.write_bytes(b"not a checkpoint at all")
    torch.manual_seed(0)
    reference = run(model, method, inputs)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="ignoring unreadable evaluation progress"):
        result = run(model, method, inputs, PassCheckpoint(path, key_of(model)))
    assert torch.equal(result.probs, reference.probs)


def test_evaluation_resumes_and_removes_its_progress(
    data_root, tokenizer, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(evaluate_module, "PROGRESS_EVERY_SECONDS", 0.0)
    task = get_task("winogrande_s", data_root)
    model, method = blob_model(bayesian_blocks=1), get_method("blob")
    kw = {"split": SPLIT, "n_samples": 4, "max_length": 96, "batch_size": 3}

    torch.manual_seed(0)
    reference = evaluate_on_task(model, method, tokenizer, task, tmp_path / "ref", **kw)
    assert not (tmp_path / "ref" / PROGRESS_FILE).exists()  # removed once metrics are written

    out = tmp_path / "stopped"
    torch.manual_seed(0)
    with pytest.raises(Stop):
        evaluate_on_task(model, counting(method, stop_after=1), tokenizer, task, out, **kw)
    assert (out / PROGRESS_FILE).is_file() and not (out / "metrics.json").exists()
    saved = torch.load(out / PROGRESS_FILE, weights_only=True)
    saved["seconds"] = 1000.0  # the stopped sitting, made long: the resumed one must count it
    torch.save(saved, out / PROGRESS_FILE)

    torch.manual_seed(99)
    again = counting(method)
    metrics = evaluate_on_task(model, again, tokenizer, task, out, **kw)
    assert type(again).calls == 2
    assert f"evaluate: resuming from {out / PROGRESS_FILE} (1 of 3 batches scored)" in (
        capsys.readouterr().err
    )
    for k in ("accuracy", "ece", "nll", "brier", "aurc", "mean_epistemic_uncertainty"):
        assert metrics[k] == reference[k], k
    assert 1000.0 < metrics["eval_seconds"] < 1000.0 + 60 * reference["eval_seconds"] + 60
    rows = [json.loads(x) for x in (out / "predictions.jsonl").open()]
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "predictions.jsonl").open()]
    assert rows == ref_rows
    assert not (out / PROGRESS_FILE).exists()

    # resume=False keeps nothing on the way
    with pytest.raises(Stop):
        evaluate_on_task(
            model, counting(method, stop_after=1), tokenizer, task, tmp_path / "off",
            resume=False, **kw,
        )  # fmt: skip
    assert not (tmp_path / "off" / PROGRESS_FILE).exists()


def test_model_fingerprint_tells_weights_apart_in_every_dtype():
    from torch import nn

    torch.manual_seed(0)
    base = nn.Linear(8, 4)
    fp = model_fingerprint(base)
    assert model_fingerprint(base) == fp  # deterministic
    changed = nn.Linear(8, 4)
    changed.load_state_dict(base.state_dict())
    with torch.no_grad():
        changed.bias[2] += 1e-3  # one value of a small tensor: hashed whole
    assert model_fingerprint(changed) != fp
    assert model_fingerprint(base.to(torch.bfloat16)) != fp  # bfloat16 hashes (no numpy dtype)
    flags = [nn.Module(), nn.Module()]
    flags[0].register_buffer("mask", torch.tensor([True, False]))
    flags[1].register_buffer("mask", torch.tensor([True, True]))
    assert model_fingerprint(flags[0]) != model_fingerprint(flags[1])
    with torch.device("meta"):  # offloaded weights: names and shapes only, no failure
        assert len(model_fingerprint(nn.Linear(8, 4))) == 64


def test_progress_counts_the_seconds_of_every_sitting(tmp_path, monkeypatch):
    """A write records the seconds loaded from the progress before plus this sitting's since
    the checkpoint was made; a file written before the seconds were recorded counts 0."""
    clock = [100.0]
    monkeypatch.setattr("blob_lora.prediction.resume.time.monotonic", lambda: clock[0])
    path = tmp_path / "p.pt"
    first = PassCheckpoint(path, "k", every_seconds=0)
    clock[0] += 12.5
    first.save(1, {"x": [torch.zeros(2)]}, None)
    second = PassCheckpoint(path, "k", every_seconds=0)
    assert second.seconds_before == 0.0 and second.load() is not None
    assert second.seconds_before == 12.5
    clock[0] += 4.0
    second.save(2, {"x": [torch.zeros(4)]}, None)
    assert torch.load(path, weights_only=True)["seconds"] == 16.5
    old = torch.load(path, weights_only=True)
    del old["seconds"]
    torch.save(old, path)
    third = PassCheckpoint(path, "k")
    assert third.load() is not None and third.seconds_before == 0.0
    assert PassCheckpoint(path, "other key").load() is None


def test_a_seeded_evaluation_gives_the_same_numbers_at_every_call(data_root, tokenizer, tmp_path):
    """``blob-lora evaluate`` used to draw from torch's generator as the process started it:
    two calls on the same run gave different metrics. Seeded, they agree bit for bit whatever
    the generator held before; another seed draws other samples."""
    task = get_task("winogrande_s", data_root)
    model, method = blob_model(bayesian_blocks=1), get_method("blob")
    kw = {"split": SPLIT, "n_samples": 4, "max_length": 96, "batch_size": 3}

    def evaluated(name: str, before: int, seed: int | None) -> tuple[dict, list]:
        torch.manual_seed(before)  # whatever the process drew before
        metrics = evaluate_on_task(model, method, tokenizer, task, tmp_path / name, seed=seed, **kw)
        rows = [json.loads(x)["probs"] for x in (tmp_path / name / "predictions.jsonl").open()]
        return metrics, rows

    first, rows_first = evaluated("a", 1, 0)
    second, rows_second = evaluated("b", 2, 0)
    assert rows_first == rows_second
    assert first["nll"] == second["nll"] and first["eval_seed"] == 0
    _, rows_other = evaluated("c", 1, 5)
    assert rows_other != rows_first
    unseeded, _ = evaluated("d", 3, None)
    assert "eval_seed" not in unseeded


@pytest.mark.parametrize("method_name", ["laplace", "swag"])
def test_saved_progress_is_keyed_on_a_posterior_beside_the_weights(
    tmp_path, data_root, char_base, char_tok, method_name
):
    """Laplace's factors and SWAG's moments are not in the model's state_dict: progress saved
    under one posterior was taken for another's with the same mean weights."""
    from blob_lora.training.saved_run import load_run
    from tests.factories import tiny_run_config, train_tiny

    out = tmp_path / method_name
    train_tiny(tiny_run_config(out, data_root, method_name), char_base, char_tok)
    loaded = load_run(out, base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    method, model = loaded.method, loaded.model
    key = evaluate_module._posterior_key(method, model)
    assert set(key) == {"posterior"}
    assert evaluate_module._posterior_key(method, model) == key  # deterministic
    if method_name == "laplace":
        model.laplace_posterior.prior_precision *= 100
    else:
        (posterior,) = model.swag_posteriors.values()
        posterior.sq_mean += 1.0
    assert evaluate_module._posterior_key(method, model) != key
    assert evaluate_module._posterior_key(get_method("lora"), model) == {}  # keys as before
