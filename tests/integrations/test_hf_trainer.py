"""BLoB inside the Hugging Face Trainer: KL in the loss, std trained, N-sample evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from blob_lora import BlobConfig, get_blob_model, kl_divergence, sampling
from blob_lora.integrations import BlobPaperAdamW, BlobTrainer
from blob_lora.training.optim import build_updater
from blob_lora.utils.errors import ConfigError
from tests.factories import tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    # Two intra-op threads on a busy 2-core machine make this tiny model 100x slower.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _examples(n: int, seed: int = 0, length: int = 12) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (length,), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _blob_model(seed: int = 0):
    torch.manual_seed(seed)
    return get_blob_model(
        tiny_llama(seed),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        BlobConfig(),
    )


def _args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class _NoKL(BlobTrainer):
    def kl_weight(self) -> float:
        return 0.0


def test_readme_snippet_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    base_model = tiny_llama(0)
    train_dataset, eval_dataset = _examples(16), _examples(8, seed=1)
    # --- the README example, verbatim ---
    from peft import LoraConfig
    from transformers import TrainingArguments

    from blob_lora import BlobConfig, get_blob_model
    from blob_lora.integrations import BlobTrainer

    model = get_blob_model(  # was: model = base_model
        base_model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        BlobConfig(prior_std=0.2, init_std=0.05),
    )
    trainer = BlobTrainer(  # was: trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir="blob-run",
            per_device_train_batch_size=4,
            num_train_epochs=3,
            learning_rate=1e-3,
            logging_steps=4,
            report_to=[],
        ),
        train_dataset=train_dataset,  # the same input_ids/labels examples as for Trainer
        eval_dataset=eval_dataset,
        eval_samples=10,  # evaluate() and predict() average the softmax of 10 weight samples
    )
    trainer.train()  # loss = NLL + pi * KL (paper's KL schedule); logs kl and pi
    metrics = trainer.evaluate()  # eval_loss: NLL of the 10-sample predictive
    # --- end of the example ---
    assert math.isfinite(metrics["eval_loss"])
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(h["kl"] > 0 and h["pi"] > 0 for h in logged)


def test_kl_enters_the_loss_once_per_step_and_trains_the_std(tmp_path) -> None:
    data = _examples(8)
    model = _blob_model()
    rho = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A_rho" in n}
    assert rho
    # kl_rescale=False: K = steps per epoch = 8 / (2 x 2) = 2, pi = 2/7, 4/7
    trainer = BlobTrainer(model=model, args=_args(tmp_path), train_dataset=data, kl_rescale=False)
    trainer.train()
    baseline = _NoKL(
        model=_blob_model(), args=_args(tmp_path), train_dataset=data, kl_rescale=False
    )
    baseline.train()
    first = trainer.state.log_history[0]
    assert first["step"] == 1 and first["pi"] == pytest.approx(2 / 7)
    assert first["kl"] > 0
    # the same first-step NLL (same init, data, noise): the loss difference is pi * KL, counted
    # once although the step accumulated two micro-batches
    nll_only = baseline.state.log_history[0]
    assert nll_only["pi"] == 0.0
    assert first["loss"] - nll_only["loss"] == pytest.approx(first["pi"] * first["kl"], rel=1e-4)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n].detach(), before) for n, before in rho.items())
    groups = trainer.optimizer.param_groups
    std_ids = {id(after[n]) for n in rho}
    assert [g["weight_decay"] for g in groups if {id(p) for p in g["params"]} == std_ids] == [0.0]


def test_evaluation_during_training_leaves_the_training_noise_alone(tmp_path) -> None:
    finals = []
    for strategy in ("no", "steps"):
        model = _blob_model()
        args = _args(tmp_path, eval_strategy=strategy, eval_steps=1)
        trainer = BlobTrainer(
            model=model, args=args, train_dataset=_examples(8), eval_dataset=_examples(4, 1)
        )
        trainer.train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert any("eval_loss" in h for h in trainer.state.log_history)
    for n, p in finals[0].items():
        torch.testing.assert_close(finals[1][n], p, rtol=0, atol=0, msg=n)


def test_paper_optimizer_matches_the_updater() -> None:
    """BlobPaperAdamW makes the update of build_updater(mode="paper") on the same gradients."""
    models = [_blob_model(), _blob_model()]
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    for model in models:
        torch.manual_seed(4)  # the same weight noise
        model(input_ids=ids, labels=ids).loss.backward()
    pi, lr, kl_lr = 0.3, 1e-2, 0.5
    updater = build_updater(
        models[0], mode="paper", bayesian=True, lr=lr, total_steps=10, warmup_ratio=0.0, kl_lr=kl_lr
    )
    updater.step(lambda: kl_divergence(models[0]), pi)
    point = [p for n, p in models[1].named_parameters() if p.requires_grad and "rho" not in n]
    std = [p for n, p in models[1].named_parameters() if "lora_A_rho" in n]
    seen = []
    opt = BlobPaperAdamW(
        [{"params": point}],
        std,
        lr=lr,
        kl_lr=kl_lr,
        kl_fn=lambda: kl_divergence(models[1]),
        weight_fn=lambda: pi,
        on_kl=lambda kl, w: seen.append((float(kl), w)),
    )
    opt.step()
    expected = dict(models[0].named_parameters())
    for n, p in models[1].named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, expected[n], rtol=0, atol=0, msg=n)
    assert len(seen) == 1 and seen[0][1] == pi and seen[0][0] > 0


def test_paper_mode_in_the_trainer(tmp_path) -> None:
    data = _examples(8)
    model = _blob_model()
    rho = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A_rho" in n}
    args = _args(tmp_path, max_steps=1)
    trainer = BlobTrainer(
        model=model, args=args, train_dataset=data, kl_rescale=False, optimizer="paper"
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, BlobPaperAdamW)
    log = trainer.state.log_history[0]
    assert log["kl"] > 0 and log["pi"] == pytest.approx(2 / 7)
    nll_only = _NoKL(model=_blob_model(), args=args, train_dataset=data, kl_rescale=False)
    nll_only.train()
    # the KL is the optimiser's business here: the logged loss is the NLL alone
    assert log["loss"] == pytest.approx(nll_only.state.log_history[0]["loss"], rel=1e-6)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n].detach(), before) for n, before in rho.items())


def _token_accuracy(pred) -> dict[str, float]:
    logits, labels = pred.predictions, pred.label_ids
    return {"accuracy": float((logits[:, :-1].argmax(-1) == labels[:, 1:]).mean())}


def test_evaluate_averages_n_weight_samples(tmp_path) -> None:
    model = _blob_model()
    eval_data = _examples(8, seed=1)
    trainer = BlobTrainer(
        model=model,
        args=_args(tmp_path),
        eval_dataset=eval_data,
        eval_samples=3,
        compute_metrics=_token_accuracy,
    )
    with torch.no_grad():  # a non-zero B, so that weight samples change the predictions
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    calls = []
    hook = model.get_base_model().register_forward_hook(lambda *_: calls.append(1))
    metrics = trainer.evaluate()
    assert len(calls) == 2 * 3  # 2 batches x 3 samples
    hook.remove()
    assert math.isfinite(metrics["eval_loss"]) and 0 <= metrics["eval_accuracy"] <= 1

    def predictions(n: int, seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        return trainer.predict(eval_data, eval_samples=n).predictions

    one_a, one_b = predictions(1, 0), predictions(1, 1)
    assert not np.allclose(one_a, one_b)  # one sample: a different weight draw per seed
    # a normalised predictive: the log of averaged probabilities
    np.testing.assert_allclose(np.exp(predictions(3, 0)).sum(-1), 1.0, rtol=1e-5)
    mean_a, mean_b = predictions(0, 0), predictions(0, 1)
    np.testing.assert_array_equal(mean_a, mean_b)  # N = 0: the mean weights
    with torch.no_grad(), sampling(model, False):
        ids = torch.stack([e["input_ids"] for e in eval_data])
        np.testing.assert_allclose(mean_a, model(input_ids=ids).logits.numpy(), rtol=1e-5)
    assert trainer.eval_samples == 3  # the per-call override is undone


def test_options_are_validated(tmp_path) -> None:
    model = _blob_model()
    args = _args(tmp_path)
    bad = [
        ({"kl_schedule": "cosine"}, "kl_schedule"),
        ({"kl_rescale": "yes"}, "kl_rescale"),
        ({"kl_gamma": 0}, "kl_gamma"),
        ({"eval_samples": -1}, "eval_samples"),
        ({"eval_samples": 2.5}, "eval_samples"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"std_lr": 0.0}, "std_lr"),
        ({"kl_lr": float("nan")}, "kl_lr"),
        ({"kl_n_train": 0}, "kl_n_train"),
        # each learning rate of the mode that would not use it
        ({"optimizer": "paper", "std_lr": 0.1}, "std_lr is the std group"),
        ({"kl_lr": 0.1}, "kl_lr is the KL SGD"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ConfigError, match=match):
            BlobTrainer(model=model, args=args, **kwargs)
    lora = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="get_blob_model"):
        BlobTrainer(model=lora, args=args)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(_examples(4))

    trainer = BlobTrainer(model=model, args=args, train_dataset=Stream())
    with pytest.raises(ConfigError, match="kl_n_train"):
        trainer.kl_weight()
    assert BlobTrainer(model=model, args=args, kl_n_train=640).kl_schedule().n_train == 640
    paper = BlobTrainer(model=model, args=_args(tmp_path, optim="adafactor"), optimizer="paper")
    with pytest.raises(ConfigError, match="adamw"):
        paper.create_optimizer()
    # an optimiser of the user's: it must hold the std, and cannot stand in for "paper"
    point = [p for n, p in model.named_parameters() if p.requires_grad and "rho" not in n]
    without_std = torch.optim.AdamW(point)
    with pytest.raises(ConfigError, match="lora_A_rho"):
        BlobTrainer(model=model, args=args, optimizers=(without_std, None)).create_optimizer()
    full = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert BlobTrainer(model=model, args=args, optimizers=(full, None)).create_optimizer() is full
    with pytest.raises(ConfigError, match="BlobPaperAdamW"):
        BlobTrainer(
            model=model, args=args, optimizers=(full, None), optimizer="paper"
        ).create_optimizer()


@pytest.mark.parametrize("mode", ["single", "paper"])
def test_fp16_loss_scale_leaves_the_update_unchanged(tmp_path, mode) -> None:
    """A GradScaler on the Trainer's accelerator (what fp16 sets up on a GPU; Accelerate has
    none on CPU) scales NLL and KL alike: the same parameters after a step as without one."""
    results = []
    for scale in (None, 1024.0):
        model = _blob_model()
        args = _args(tmp_path, max_steps=1, max_grad_norm=0.0)
        trainer = BlobTrainer(
            model=model, args=args, train_dataset=_examples(8), kl_rescale=False, optimizer=mode
        )
        if scale is not None:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        trainer.train()
        assert trainer.optimizer.scaler is trainer.accelerator.scaler
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    plain, scaled = results
    for n, p in plain.items():
        torch.testing.assert_close(scaled[n], p, rtol=1e-6, atol=1e-7, msg=n)


def test_trainer_gradient_checkpointing_learns_the_same_adapter(tmp_path) -> None:
    """The Trainer's own ``gradient_checkpointing=True`` (transformers' non-reentrant kind,
    which replays the random state): BLoB's noise is drawn again as in the forward, so the
    adapter equals the one trained without it."""
    trained = {}
    for checkpointing in (False, True):
        model = _blob_model(0)
        args = _args(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing)
        BlobTrainer(model=model, args=args, train_dataset=_examples(16)).train()
        blocks = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert all(b.gradient_checkpointing is checkpointing for b in blocks) and blocks
        trained[checkpointing] = {
            n: p.detach() for n, p in model.named_parameters() if p.requires_grad
        }
    assert any("lora_A_rho" in n for n in trained[False])
    for name, value in trained[False].items():
        torch.testing.assert_close(trained[True][name], value, rtol=0, atol=1e-7, msg=name)


def _zero_std(model) -> None:
    """std = G**2 = 0 (std_param "square"): every weight sample is the mean weights."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A_rho" in n:
                p.zero_()
            if "lora_B" in n:
                p.normal_(std=0.5)


def test_eval_loss_shifts_labels_for_a_causal_lm_subclass(tmp_path) -> None:
    """A user's subclass of a causal LM (transformers lists only its own class names) is
    scored as a causal LM: position i predicts token i + 1. With the std at 0 one weight
    sample is the mean weights, so eval_loss is the shifted NLL computed by hand."""
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    base = tiny_llama(0)
    sub = MyLlama(base.config)
    sub.load_state_dict(base.state_dict())
    sub.lm_head.weight.data.mul_(20)  # peaked predictions: shifted and unshifted NLL differ
    model = get_blob_model(
        sub.eval(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), BlobConfig()
    )
    _zero_std(model)
    data = _examples(4, seed=1)
    ids = torch.stack([e["input_ids"] for e in data])
    with torch.no_grad(), sampling(model, False):
        log_p = torch.log_softmax(model(input_ids=ids).logits, -1)
    shifted = -log_p[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    unshifted = -log_p.gather(-1, ids[..., None]).mean()
    assert abs(float(shifted - unshifted)) > 1e-3  # 1e-6 below tells the two apart
    trainer = BlobTrainer(model=model, args=_args(tmp_path), eval_samples=1)
    assert trainer.evaluate(data)["eval_loss"] == pytest.approx(float(shifted), rel=1e-6)


def test_remote_code_causal_lm_is_known_by_its_auto_map() -> None:
    from blob_lora.integrations.hf_trainer import _is_causal_lm

    class RemoteLM(torch.nn.Module):  # a trust_remote_code class transformers does not list
        def __init__(self, auto_map):
            super().__init__()
            self.config = tiny_llama(0).config
            self.config.auto_map = auto_map

    assert _is_causal_lm(RemoteLM({"AutoModelForCausalLM": "modeling_remote.RemoteLM"}))
    assert not _is_causal_lm(RemoteLM({"AutoModel": "modeling_remote.RemoteLM"}))
    assert not _is_causal_lm(RemoteLM({}))


def test_kl_schedule_uses_the_batch_the_trainer_trains_with(tmp_path) -> None:
    """DataParallel and auto_find_batch_size change the Trainer's batch (_train_batch_size)
    away from per_device_train_batch_size: the KL cycle follows the Trainer's."""
    model = _blob_model()
    trainer = BlobTrainer(
        model=model, args=_args(tmp_path), train_dataset=_examples(16), kl_rescale=False
    )
    assert trainer.kl_schedule().cycle == 4  # 16 examples / (2 x 2 accumulated)
    trainer._train_batch_size = 1  # what the Trainer sets after an out-of-memory retry
    assert trainer.kl_schedule().cycle == 8
    trainer._train_batch_size = 4  # two GPUs under DataParallel, 2 each
    assert trainer.kl_schedule().cycle == 2
    rescaled = BlobTrainer(model=model, args=_args(tmp_path), train_dataset=_examples(16))
    rescaled._train_batch_size = 4
    # the authors' rescaled cycle int(100 * n^(pi/gamma) / global batch), global batch 4 x 2
    expected = int(100 * 16 ** (math.pi / 8) / 8)
    assert rescaled.kl_schedule().cycle == expected != int(100 * 16 ** (math.pi / 8) / 4)


def _classifier(num_labels: int, **config):
    from transformers import LlamaForSequenceClassification

    base = tiny_llama(0)
    cfg = base.config
    cfg.num_labels, cfg.pad_token_id = num_labels, 0
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return get_blob_model(
        LlamaForSequenceClassification(cfg).eval(),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
        BlobConfig(),
    )


def test_non_categorical_heads_are_refused_with_weight_samples(tmp_path) -> None:
    """Averaging softmaxes is the predictive of a categorical head only: a regression head
    (one output) or multi-label one gets a clear error with N > 0, and works with N = 0."""
    args = _args(tmp_path)
    ids = _examples(4)
    regression = _classifier(1)
    with pytest.raises(ConfigError, match="num_labels=1"):
        BlobTrainer(model=regression, args=args, eval_samples=2)
    trainer = BlobTrainer(model=regression, args=args, eval_samples=0)
    rows = [{"input_ids": e["input_ids"], "labels": torch.tensor(0.5)} for e in ids]
    assert math.isfinite(trainer.evaluate(rows)["eval_loss"])
    with pytest.raises(ConfigError, match="regression"):  # the forward set problem_type
        trainer.evaluate(rows, eval_samples=2)  # nothing averaged, no wrong numbers
    with pytest.raises(ConfigError, match="multi_label"):
        BlobTrainer(model=_classifier(3, problem_type="multi_label_classification"), args=args)
    multi = BlobTrainer(model=_classifier(3), args=args, eval_samples=2)  # problem_type unset
    hot = [{"input_ids": e["input_ids"], "labels": torch.tensor([1.0, 0.0, 1.0])} for e in ids]
    with pytest.raises(ConfigError, match="floating-point labels"):
        multi.evaluate(hot)
    single = [
        {"input_ids": e["input_ids"], "labels": torch.tensor(i % 3)} for i, e in enumerate(ids)
    ]
    assert math.isfinite(multi.evaluate(single)["eval_loss"])  # single-label: averaged


def test_compute_loss_func_gets_the_models_output_class(tmp_path) -> None:
    """A loss function written for the Trainer reads ``outputs.logits``; with N > 0 it gets
    the averaged predictive in the model's own output class and gives the default's loss."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    seen = []

    def token_nll(outputs, labels, num_items_in_batch=None):
        seen.append(type(outputs))
        logits = outputs.logits[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )

    data = _examples(4, seed=2)
    losses = []
    for loss_func in (None, token_nll):
        model = _blob_model()
        _zero_std(model)
        trainer = BlobTrainer(
            model=model, args=_args(tmp_path), eval_samples=2, compute_loss_func=loss_func
        )
        losses.append(trainer.evaluate(data)["eval_loss"])
    assert seen and all(t is CausalLMOutputWithPast for t in seen)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_eval_samples_default_to_the_models_blob_config(tmp_path) -> None:
    torch.manual_seed(0)
    model = get_blob_model(
        tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj"]), BlobConfig(eval_samples=4)
    )
    assert BlobTrainer(model=model, args=_args(tmp_path)).eval_samples == 4
    assert BlobTrainer(model=model, args=_args(tmp_path), eval_samples=2).eval_samples == 2
    model.save_pretrained(tmp_path / "adapter")
    from blob_lora import load_blob_model

    loaded = load_blob_model(tiny_llama(0), tmp_path / "adapter")
    assert BlobTrainer(model=loaded, args=_args(tmp_path)).eval_samples == 4


def test_class_logits_of_a_causal_lm_subclass_are_not_shifted(tmp_path) -> None:
    """A causal LM's subclass that returns one row of class logits per example (BLoB's own
    multiple-choice layout: the answer letters' logits at the last position, labels (B,))
    has no positions to shift: eval_loss is the plain NLL of each example's own label."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import SequenceClassifierOutput

    letters = [5, 6, 7, 8]

    class LetterClassifier(LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = super().forward(input_ids=input_ids).logits[:, -1, letters]
            loss = None if labels is None else F.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    import torch.nn.functional as F

    base = tiny_llama(0)
    sub = LetterClassifier(base.config)
    sub.load_state_dict(base.state_dict())
    sub.lm_head.weight.data.mul_(20)
    model = get_blob_model(
        sub.eval(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), BlobConfig()
    )
    _zero_std(model)
    gen = torch.Generator().manual_seed(3)
    rows = [
        {"input_ids": torch.randint(0, 128, (12,), generator=gen), "labels": torch.tensor(i % 4)}
        for i in range(8)
    ]
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    with torch.no_grad(), sampling(model, False):
        right = float(F.cross_entropy(model(input_ids=ids).logits, labels))
    args = _args(tmp_path, per_device_eval_batch_size=8)
    trainer = BlobTrainer(model=model, args=args, eval_samples=1)
    assert trainer.evaluate(rows)["eval_loss"] == pytest.approx(right, rel=1e-6)


def test_compute_loss_func_gets_a_custom_output_class_with_fields_of_its_own(tmp_path) -> None:
    from dataclasses import dataclass

    from transformers.utils import ModelOutput

    @dataclass
    class Out(ModelOutput):
        hidden: torch.Tensor = None  # first field, required by the model's own code
        logits: torch.Tensor = None

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, labels=None, **kwargs):
            return Out(hidden=input_ids, logits=self.inner(input_ids=input_ids).logits)

    seen = []

    def loss(outputs, labels, num_items_in_batch=None):
        seen.append((type(outputs), outputs.hidden is not None))
        logits = outputs.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    import torch.nn.functional as F

    model = _blob_model()
    trainer = BlobTrainer(model=model, args=_args(tmp_path), eval_samples=2, compute_loss_func=loss)
    trainer.model = trainer.model_wrapped = Wrapped(model)
    assert math.isfinite(trainer.evaluate(_examples(4))["eval_loss"])
    assert seen and all(kind is Out and has_hidden for kind, has_hidden in seen)
