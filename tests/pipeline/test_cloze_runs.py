"""Cloze scoring through the whole harness: train, evaluate (and override), predict, prefix
cache, resume of runs written before the setting existed."""

from __future__ import annotations

import json

import pytest
import torch

from blob_lora.cli.main import main
from blob_lora.methods import get_method
from blob_lora.pipeline import train
from blob_lora.prediction import Predictor, predict_dataset
from blob_lora.tasks import Scoring, get_task, task_inputs
from blob_lora.training import TrainConfig
from blob_lora.training.run_dir import RUN_CONFIG, check_run_dir
from tests.factories import tiny_llama
from tests.training.test_train_loop import tiny_cfg

TOP_BLOCK = r".*\.layers\.1\.self_attn\.(q_proj|v_proj)|.*lm_head"


def samples_and_labels(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample probabilities (S, N, C) and labels of prediction's dataset loop."""
    scored = predict_dataset(*args, **kwargs)
    return scored.sample_probs, scored.labels


@pytest.mark.parametrize("method", ["lora", "blob", "bayesian-lora"])
def test_cloze_run_trains_evaluates_and_predicts(
    tmp_path, data_root, tiny_model_dir, method, capsys
) -> None:
    cfg = tiny_cfg(tmp_path, data_root, tiny_model_dir, method=method, scoring="cloze")
    summary = train(cfg, progress=False)
    run = tmp_path / "run"
    assert json.loads((run / RUN_CONFIG).read_text())["scoring"] == "cloze"
    m = summary["evaluations"]["arc_easy"]
    assert m["scoring"] == "cloze" and m["n_examples"] == 10 and 0 <= m["ece"] <= 1
    # evaluate re-opens the run with its own scoring, or another one when asked
    assert (
        main(["evaluate", "--run", str(run), "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    )
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["scoring"] == "cloze" and again["nll"] == pytest.approx(m["nll"], abs=0.05)
    argv = ["evaluate", "--run", str(run), "--out", str(tmp_path / "ev2"), "--no-progress"]
    assert main([*argv, "--scoring", "cloze", "--length-norm", "char"]) == 0
    normed = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert normed["scoring"] == "cloze (char)" and normed["nll"] != pytest.approx(m["nll"])
    # predictions on the user's own questions use the run's scoring
    predictor = Predictor.from_run(run, n_samples=2)
    assert predictor.scoring == Scoring("cloze")
    rows = predictor.predict(
        [{"question": "What melts ice?", "choices": ["heat", "cold", "a rock"], "answer": 0}]
    )
    assert len(rows[0]["probs"]) == 3 and sum(rows[0]["probs"]) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["blob", "bayesian-lora"])
def test_cloze_prefix_cache_gives_the_same_predictive(data_root, smollm2_tokenizer, tmp_path, name):
    task = get_task("openbookqa", data_root=str(data_root))
    inputs = task_inputs(task, "validation[:9]", smollm2_tokenizer, 160, scoring=Scoring("cloze"))
    method = get_method(name)
    torch.manual_seed(0)
    model = method.build(
        tiny_llama(vocab_size=len(smollm2_tokenizer)),
        TrainConfig(target_modules=[TOP_BLOCK], init_std=0.5),
    ).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_(std=0.5)
            if key.endswith("u_mean"):  # Bayesian-LoRA: factors large enough to matter
                p.mul_(30.0)
            if key.endswith(("u_std_raw", "lamda_raw")):  # and its spread at the clamps
                p.fill_(5.0)
    args = (model, method, inputs.dataset, inputs.collator, None, 3, 4)
    torch.manual_seed(5)
    full, labels = samples_and_labels(*args, fold=3, prefix_cache=False)
    torch.manual_seed(5)
    cached, labels2 = samples_and_labels(*args, fold=3, prefix_cache=True, cache_dir=tmp_path)
    assert full.shape == (3, 9, 4) and torch.equal(labels, labels2)
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)
    assert (full[0] - full[1]).abs().max() > 1e-3  # the samples really differ
    assert len(list((tmp_path / "prefix").glob("*.safetensors"))) == 1


def test_a_run_written_before_scoring_existed_resumes_as_letter(tmp_path) -> None:
    cfg = TrainConfig(out=str(tmp_path / "old"))
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("scoring", "length_norm")}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / RUN_CONFIG).write_text(json.dumps(old))
    assert check_run_dir(tmp_path / "old", cfg.to_dict(), overwrite=False, resume=True)
    cloze = TrainConfig(out=str(tmp_path / "old"), scoring="cloze").to_dict()
    with pytest.raises(Exception, match="scoring"):
        check_run_dir(tmp_path / "old", cloze, overwrite=False, resume=True)
