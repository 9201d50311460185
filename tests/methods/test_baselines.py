"""The paper's baselines in the shared harness, on a tiny random Llama and real data slices:
every method trains and evaluates; MC-dropout really samples; the ensemble really averages K
different adapters; Laplace-LoRA stores and reloads its posterior; the CLI trains and
evaluates an ensemble run folder."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from blob_lora.methods import METHODS as REGISTERED
from blob_lora.methods.io import load_plain_adapter
from blob_lora.methods.registry import method_of
from blob_lora.tasks import MCCollator, MCDataset, get_task, option_token_ids
from blob_lora.training.saved_run import load_run
from blob_lora.utils.errors import ConfigError
from tests.factories import (
    TINY_EVAL_SPLIT,
    TINY_TASK,
    TINY_TRAIN_SPLIT,
    tiny_model_folder,
    tiny_run_config,
    train_tiny,
)

torch.set_num_threads(1)
HAS_LAPLACE = importlib.util.find_spec("blob_lora.methods.laplace") is not None


def eval_batch(char_tok, data_root: Path):
    task = get_task(TINY_TASK, data_root=str(data_root))
    ds = MCDataset(task, TINY_EVAL_SPLIT, char_tok, 256)
    batch = MCCollator(char_tok.pad_token_id, task.n_options)([ds[i] for i in range(len(ds))])
    return batch, option_token_ids(char_tok, task)


def read_probs(path: Path) -> torch.Tensor:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return torch.tensor([r["probs"] for r in rows], dtype=torch.float64)


# every registered method trained on one task (laplace when its package is installed): a new
# one is covered too; meta-learned ones (abmll) have tests/pipeline/test_meta.py
METHODS = [name for name, m in REGISTERED.items() if not m.meta_learned]


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_evaluates(method, tmp_path, data_root, char_base, char_tok):
    cfg = tiny_run_config(tmp_path / method, data_root, method)
    summary = train_tiny(cfg, char_base, char_tok)
    m = summary["evaluations"][TINY_TASK]
    assert summary["method"] == method and m["method"] == method
    assert m["n_examples"] == 6.0 and m["split"] == TINY_EVAL_SPLIT
    assert 0.0 <= m["accuracy"] <= 1.0 and m["nll"] > 0 and 0 <= m["brier"] <= 2
    # the run asks for 4; a deterministic forward (lora, map) is evaluated once, as N = 0
    expected_samples = {"lora": 0, "map": 0, "mc-dropout": 4, "ensemble": 2, "blob": 4}
    assert m["eval_samples"] == expected_samples.get(method, 4)
    out = Path(cfg.out)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["evaluations"][TINY_TASK]["accuracy"] == m["accuracy"]
    assert (out / "eval" / TINY_TASK / "predictions.jsonl").is_file()
    assert json.loads((out / "run_config.json").read_text())["method"] == method
    if method == "blob":  # where the std of A ended, per layer and overall
        std = summary["std_of_A"]
        assert 0 < std["q01"] <= std["q99"] and std["spread"] >= 0 and std["layers"]
        assert saved["std_of_A"] == std
    if method in ("mc-dropout", "ensemble", "blob", "laplace", "tfb", "bayesian-lora"):
        assert m["mean_epistemic_uncertainty"] > 0  # the samples disagree
    # the method's default where the setting was left at 0: run_config.json keeps the 0
    if method == "map":
        assert saved["weight_decay"] == 1e-5 and cfg.loop.weight_decay == 0.0
    if method == "mc-dropout":
        assert saved["lora_dropout"] == 0.1 and cfg.lora.lora_dropout == 0.0


def test_a_deterministic_method_asked_for_samples_runs_one_pass(
    tmp_path, data_root, char_base, char_tok
):
    # N copies of LoRA's one forward would cost N times as much and say nothing more: any N
    # becomes 0; the methods that sample keep the N asked for
    cfg = tiny_run_config(tmp_path / "lora", data_root, "lora")
    train_tiny(cfg, char_base, char_tok)
    loaded = load_run(Path(cfg.out), base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    assert [loaded.method.eval_samples(loaded.model, n) for n in (None, 0, 7)] == [0, 0, 0]
    assert REGISTERED["map"].eval_samples(loaded.model, 7) == 0
    for sampling in ("mc-dropout", "swag"):
        assert REGISTERED[sampling].eval_samples(loaded.model, 7) == 7
    batch, option_ids = eval_batch(char_tok, data_root)
    n = loaded.method.eval_samples(loaded.model, 7)
    assert loaded.method.predict_samples(loaded.model, batch, option_ids, n).shape == (1, 6, 2)


def test_mc_dropout_samples_differ_at_prediction(tmp_path, data_root, char_base, char_tok):
    cfg = tiny_run_config(tmp_path / "mc-dropout", data_root, "mc-dropout")
    train_tiny(cfg, char_base, char_tok)
    loaded = load_run(Path(cfg.out), base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    assert loaded.model.peft_config["default"].lora_dropout == 0.1
    batch, option_ids = eval_batch(char_tok, data_root)
    samples = loaded.method.predict_samples(loaded.model, batch, option_ids, 4)
    assert samples.shape == (4, 6, 2)
    assert (samples[0] - samples[1]).abs().max() > 1e-4  # dropout active at prediction
    mean1 = loaded.method.predict_samples(loaded.model, batch, option_ids, 0)
    mean2 = loaded.method.predict_samples(loaded.model, batch, option_ids, 0)
    assert torch.equal(mean1, mean2)  # N = 0: dropout off, deterministic
    assert not any(m.training for n, m in loaded.model.named_modules() if "lora_dropout" in n)


def test_ensemble_averages_different_members(tmp_path, data_root, char_base, char_tok):
    cfg = tiny_run_config(tmp_path / "ensemble", data_root, "ensemble", ensemble_size=3)
    summary = train_tiny(cfg, char_base, char_tok)
    out = Path(cfg.out)
    assert [m["seed"] for m in summary["members"]] == [1000, 1001, 1002]
    assert summary["train_seconds"] == pytest.approx(
        sum(m["train_seconds"] for m in summary["members"]), abs=2e-3
    )
    for k in range(3):
        assert (out / "members" / str(k) / "summary.json").is_file()
        assert (out / "adapter" / f"member-{k}" / "adapter_model.safetensors").is_file()

    # each member on its own, as a plain LoRA model
    batch, option_ids = eval_batch(char_tok, data_root)
    from blob_lora.models.forward import answer_logits

    member_probs, member_a = [], []
    for k in range(3):
        model = load_plain_adapter(copy.deepcopy(char_base), out / "adapter" / f"member-{k}")
        with torch.no_grad():
            member_probs.append(torch.softmax(answer_logits(model, batch, option_ids), -1))
        member_a.append(
            torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_A" in n])
        )
    assert (member_a[0] - member_a[1]).abs().max() > 1e-3  # independent initialisations
    assert (member_a[1] - member_a[2]).abs().max() > 1e-3
    assert (member_probs[0] - member_probs[1]).abs().max() > 1e-5
    expected = torch.stack(member_probs).mean(0).double()

    loaded = load_run(out, base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    samples = loaded.method.predict_samples(loaded.model, batch, option_ids, 0)
    assert samples.shape == (3, 6, 2)
    torch.testing.assert_close(samples.double(), torch.stack(member_probs).double())
    written = read_probs(out / "eval" / TINY_TASK / "predictions.jsonl")
    torch.testing.assert_close(written, expected, atol=1e-5, rtol=0)
    # --eval-samples 2: the first two members only
    assert loaded.method.eval_samples(loaded.model, 2) == 2
    two = loaded.method.predict_samples(loaded.model, batch, option_ids, 2)
    torch.testing.assert_close(two.double(), torch.stack(member_probs[:2]).double())


@pytest.mark.skipif(not HAS_LAPLACE, reason="blob_lora.methods.laplace not installed")
def test_laplace_state_round_trips(tmp_path, data_root, char_base, char_tok):
    cfg = tiny_run_config(tmp_path / "laplace", data_root, "laplace")
    summary = train_tiny(cfg, char_base, char_tok)
    out = Path(cfg.out)
    info = summary["laplace"]
    assert info["n_data"] == 8 and info["prior_precision"] > 0
    assert (out / "adapter" / "laplace_state.safetensors").is_file()
    assert json.loads((out / "map" / "run_config.json").read_text())["method"] == "map"
    assert summary["train_seconds"] >= summary["map_train_seconds"]

    batch, option_ids = eval_batch(char_tok, data_root)
    a = load_run(out, base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    b = load_run(out, base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    assert a.model.laplace_posterior.prior_precision == info["prior_precision"]
    probit_a = a.method.predict_samples(a.model, batch, option_ids, 0)
    probit_b = b.method.predict_samples(b.model, batch, option_ids, 0)
    assert probit_a.shape == (1, 6, 2)
    torch.testing.assert_close(probit_a, probit_b)
    torch.manual_seed(0)
    samples = a.method.predict_samples(a.model, batch, option_ids, 200)
    assert samples.shape == (200, 6, 2)
    assert samples.std(0).max() > 1e-4  # a real posterior spread
    # the MC predictive approaches the probit approximation of the same Gaussian
    assert (samples.mean(0) - probit_a[0]).abs().max() < 0.05
    # the MAP mean is the linearisation point: the predictive mean logits are the MAP's
    mean_logits, _ = a.model.laplace_posterior.predictive_logit_moments(batch)
    plain = load_plain_adapter(copy.deepcopy(char_base), out / "map" / "adapter")
    from blob_lora.models.forward import answer_logits

    with torch.no_grad():
        torch.testing.assert_close(mean_logits, answer_logits(plain, batch, option_ids))
    # a loaded Laplace model is recognised as one (the API asked no method: it was taken for
    # plain LoRA, with no samples and no epistemic part)
    assert method_of(a.model).name == "laplace"
    # the fit's scoring is recorded and another one refused: the head's curvature is of the
    # rows the fit's scoring reads
    assert info["fit_scoring"] == "letter" and a.model.laplace_fit_scoring == "letter"
    a.model.laplace_fit_scoring = "cloze"
    with pytest.raises(ConfigError, match="fitted under cloze scoring.*--scoring cloze"):
        a.method.predict_samples(a.model, batch, option_ids, 2)
    # inference mode forbids the linearisation's gradients: said, not a torch error
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        b.method.predict_samples(b.model, batch, option_ids, 2)


@pytest.mark.skipif(not HAS_LAPLACE, reason="blob_lora.methods.laplace not installed")
def test_laplace_refuses_a_target_it_cannot_fit_before_training(
    tmp_path, data_root, char_base, char_tok
):
    """An embedding target (not an nn.Linear) was refused by the fit, after the whole MAP run
    had trained; now before the run folder exists."""
    cfg = tiny_run_config(
        tmp_path / "laplace", data_root, "laplace", target_modules=["q_proj", "embed_tokens"]
    )
    with pytest.raises(ConfigError, match=r"lora_embedding_A.*drop those layers from --target"):
        train_tiny(cfg, char_base, char_tok)
    assert not (tmp_path / "laplace").exists()
    # a target that matches nothing: PEFT's error said in one line, as a plain run says it
    cfg = tiny_run_config(tmp_path / "laplace", data_root, "laplace", target_modules=["q_prj"])
    with pytest.raises(ConfigError, match=r"cannot put a map adapter on .*--target-modules q_prj"):
        train_tiny(cfg, char_base, char_tok)
    assert not (tmp_path / "laplace").exists()


@pytest.mark.skipif(not HAS_LAPLACE, reason="blob_lora.methods.laplace not installed")
def test_the_pre_flight_builds_the_callers_own_model_class(char_base, char_tok) -> None:
    """A base model of a class the Auto classes do not know (the Python API) was refused by
    the pre-flight check; its empty copy is built from its own class."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from blob_lora.pipeline.composite import _meta_model
    from blob_lora.training import TrainConfig
    from blob_lora.training.trainer import RunStart

    class OwnConfig(LlamaConfig):
        model_type = "own-llama-for-a-test"

    class OwnLM(LlamaForCausalLM):
        config_class = OwnConfig

    settings = {k: v for k, v in char_base.config.to_dict().items() if k != "model_type"}
    base = OwnLM(OwnConfig(**settings))
    empty = _meta_model(
        TrainConfig(method="laplace"), RunStart(base_model=base, tokenizer=char_tok)
    )
    assert type(empty) is OwnLM and next(empty.parameters()).device.type == "meta"


def test_tfb_rotation_keeps_the_product_and_gives_isotropic_noise():
    from blob_lora.methods.tfb import rotate, std_param_for

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g)
    a2, b2, d = rotate(a, b)
    torch.testing.assert_close(b2 @ a2, b @ a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b2.T @ b2, torch.diag(d * d).float(), atol=1e-4, rtol=1e-4)
    rho = std_param_for(0.01, d, 16)
    std = (rho * rho).double()
    # B' diag(std) has orthogonal columns of norm sigma: the weight noise B' dA' is isotropic
    torch.testing.assert_close(std[:, 0] * d, torch.full((4,), 0.01, dtype=torch.float64))
    dead = std_param_for(0.01, torch.tensor([2.0, 0.0]), 3)
    assert dead[1].abs().max() == 0 and dead[0].abs().min() > 0


def test_tfb_search_stays_within_its_bounds():
    """Where every σ passes, the search ends at MAX_SIGMA, not one ×4 step past it (16.4);
    where every σ fails, MIN_SIGMA itself is tried (not 6e-8) and the answer is 0; a threshold
    in between is bracketed and bisected to within the last geometric step."""
    from blob_lora.methods.tfb import MAX_SIGMA, MIN_SIGMA, largest_sigma

    tried: list[float] = []

    def record(result):
        def ok(sigma):
            tried.append(sigma)
            return result(sigma)

        return ok

    assert largest_sigma(record(lambda s: True)) == MAX_SIGMA and max(tried) == MAX_SIGMA
    tried.clear()
    assert largest_sigma(record(lambda s: False)) == 0.0 and min(tried) == MIN_SIGMA
    tried.clear()
    found = largest_sigma(record(lambda s: s <= 0.02))
    assert found <= 0.02 and 0.02 / found < 4.0 ** (1 / 2**6) + 1e-12
    assert min(tried) >= MIN_SIGMA and max(tried) <= MAX_SIGMA


def test_tfb_ignores_an_init_std_of_another_std_param(tmp_path, data_root, char_base, char_tok):
    """TFB sets the std itself (square parameterisation): an --init-std valid for softplus
    was refused after the LoRA sub-run had trained, and --resume could not get past it."""
    cfg = tiny_run_config(
        tmp_path / "tfb", data_root, "tfb", max_steps=2, std_param="softplus", init_std=5.0
    )
    assert train_tiny(cfg, char_base, char_tok)["tfb"]["sigma"] >= 0


def test_tfb_mean_model_is_the_trained_lora(tmp_path, data_root, char_base, char_tok):
    # no warmup: the paper schedule's first step is at lr 0 (the authors'), and 3 steps of a
    # decaying lr leave B too small for any sigma to cost 0.3 % anchor NLL
    cfg = tiny_run_config(tmp_path / "tfb", data_root, "tfb", max_steps=4, warmup_ratio=0.0)
    summary = train_tiny(cfg, char_base, char_tok)
    out = Path(cfg.out)
    info = summary["tfb"]
    assert info["sigma"] > 0 and info["anchor_size"] == 8
    worst = max(t["nll"] for t in info["trace"] if t["sigma"] <= info["sigma"])
    assert worst <= info["anchor_nll_mean_model"] * 1.003 + 1e-9
    assert any(t["nll"] > info["anchor_nll_mean_model"] * 1.003 for t in info["trace"])

    batch, option_ids = eval_batch(char_tok, data_root)
    from blob_lora.models.forward import answer_logits

    lora = load_plain_adapter(copy.deepcopy(char_base), out / "lora" / "adapter")
    with torch.no_grad():
        expected = torch.softmax(answer_logits(lora, batch, option_ids), -1)
    loaded = load_run(out, base_model=copy.deepcopy(char_base), tokenizer=char_tok)
    mean = loaded.method.predict_samples(loaded.model, batch, option_ids, 0)[0]
    torch.testing.assert_close(mean, expected, atol=1e-5, rtol=0)
    samples = loaded.method.predict_samples(loaded.model, batch, option_ids, 3)
    assert (samples[0] - samples[1]).abs().max() > 1e-6


def test_cli_trains_and_evaluates_an_ensemble(tmp_path, data_root, capsys):
    from blob_lora.cli.main import main

    model_dir = tiny_model_folder(tmp_path / "model")
    run_dir = tmp_path / "ens"
    common = ["--data-root", str(data_root), "--no-progress"]
    rc = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--task",
            TINY_TASK,
            "--method",
            "ensemble",
            "--ensemble-size",
            "2",
            "--out",
            str(run_dir),
            "--train-split",
            TINY_TRAIN_SPLIT,
            "--eval-split",
            TINY_EVAL_SPLIT,
            "--max-steps",
            "2",
            "--max-length",
            "256",
            "--lr",
            "0.01",
            "--target-modules",
            "q_proj,v_proj",
            *common,
        ]
    )
    assert rc == 0
    trained = json.loads((run_dir / "summary.json").read_text())["evaluations"][TINY_TASK]
    rc = main(["evaluate", "--run", str(run_dir), "--out", str(tmp_path / "again"), *common])
    assert rc == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["method"] == "ensemble" and again["eval_samples"] == 2
    for key in ("accuracy", "ece", "nll", "brier"):
        assert again[key] == pytest.approx(trained[key], abs=1e-6)
    assert "samples=2" in capsys.readouterr().out
