"""The frozen-prefix cache: where the prefix ends, and that using it changes nothing but time."""

from __future__ import annotations

import json
import warnings
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from blob_lora.methods import get_method
from blob_lora.models.prefix_cache import (
    PrefixFeatureCache,
    frozen_prefix_length,
    prefix_fingerprint,
)
from blob_lora.pipeline import train
from blob_lora.prediction import predict_dataset
from blob_lora.tasks import MCCollator, MCDataset, get_task, option_token_ids
from blob_lora.training import TrainConfig
from tests.factories import tiny_llama

TOP_BLOCK = r".*\.layers\.1\.self_attn\.(q_proj|v_proj)|.*lm_head"


def samples_and_labels(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample probabilities (S, N, C) and labels of prediction's dataset loop."""
    scored = predict_dataset(*args, **kwargs)
    return scored.sample_probs, scored.labels


def lora(model, targets=TOP_BLOCK, **kw):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))


def test_prefix_ends_at_the_first_adapted_block() -> None:
    assert frozen_prefix_length(lora(tiny_llama())) == 1
    # adapters in block 0: nothing is frozen before them
    assert frozen_prefix_length(lora(tiny_llama(), ["q_proj", "v_proj", "lm_head"])) == 0
    # LoRA dropout counts as randomness inside its block, not before it
    assert frozen_prefix_length(lora(tiny_llama(), lora_dropout=0.1)) == 1
    # a trainable embedding runs before every block
    model = lora(tiny_llama())
    model.get_input_embeddings().weight.requires_grad_(True)
    assert frozen_prefix_length(model) == 0
    # a loaded, frozen adapter is still found by its parameter names
    model = lora(tiny_llama())
    for p in model.parameters():
        p.requires_grad_(False)
    assert frozen_prefix_length(model) == 1
    # a plain model has no adapter at all: every block would be "frozen", which says nothing
    assert frozen_prefix_length(tiny_llama()) == 0


def test_base_model_dropout_disables_the_cache_while_training() -> None:
    model = lora(tiny_llama())
    model.config.attention_dropout = 0.1
    model.train()
    assert frozen_prefix_length(model) == 0
    model.eval()
    assert frozen_prefix_length(model) == 1


def test_fingerprint_changes_with_prefix_weights_only() -> None:
    a, b = lora(tiny_llama(seed=0)), lora(tiny_llama(seed=0))
    assert prefix_fingerprint(a, 1) == prefix_fingerprint(b, 1)
    with torch.no_grad():  # the suffix (block 1) does not determine the prefix output
        b.base_model.model.model.layers[1].mlp.up_proj.weight.add_(1.0)
    assert prefix_fingerprint(a, 1) == prefix_fingerprint(b, 1)
    with torch.no_grad():
        b.base_model.model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    assert prefix_fingerprint(a, 1) != prefix_fingerprint(b, 1)
    # the wrapper does not matter: BLoB and MC-dropout runs on one base share LoRA's features
    cfg = TrainConfig(target_modules=[TOP_BLOCK], lora_dropout=0.0)
    wrapped = {
        m: get_method(m).build(tiny_llama(seed=0), cfg) for m in ("lora", "blob", "mc-dropout")
    }
    assert type(wrapped["blob"]) is not type(wrapped["lora"])
    assert {prefix_fingerprint(w, 1) for w in wrapped.values()} == {prefix_fingerprint(a, 1)}


@pytest.fixture
def arc(data_root, smollm2_tokenizer):
    task = get_task("arc_easy", data_root=str(data_root))
    dataset = MCDataset(task, "validation[:11]", smollm2_tokenizer, 96)
    collator = MCCollator(smollm2_tokenizer.pad_token_id, task.n_options)
    return dataset, collator, option_token_ids(smollm2_tokenizer, task)


def _model(method_name: str, vocab: int):
    method = get_method(method_name)
    cfg = TrainConfig(target_modules=[TOP_BLOCK], lora_dropout=0.0)
    torch.manual_seed(0)
    model = method.build(tiny_llama(vocab_size=vocab), cfg)
    with torch.no_grad():  # non-zero B and a visible std so samples and adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return method, model.eval()


@pytest.mark.parametrize(("method_name", "n"), [("lora", 0), ("blob", 4), ("mc-dropout", 3)])
def test_cached_evaluation_equals_the_full_forward(
    arc, smollm2_tokenizer, tmp_path, method_name, n
) -> None:
    dataset, collator, option_ids = arc
    method, model = _model(method_name, len(smollm2_tokenizer))
    args = (model, method, dataset, collator, option_ids, n, 4)
    torch.manual_seed(5)
    full, labels = samples_and_labels(*args, fold=2, prefix_cache=False)
    torch.manual_seed(5)  # same noise: the prefix draws no random numbers
    cached, labels2 = samples_and_labels(*args, fold=2, prefix_cache=True, cache_dir=tmp_path)
    assert full.shape == cached.shape == (max(1, n), 11, 5)  # ARC: up to 5 options
    assert torch.equal(labels, labels2)
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)
    if n > 1:  # the samples really differ, so the comparison covers the folded noise path
        assert (full[0] - full[1]).abs().max() > 1e-3
    # the features went to disk, one entry per example, and a second run reads them back
    (path,) = (tmp_path / "prefix").glob("*.safetensors")
    assert len(load_file(str(path))) == 11
    again = PrefixFeatureCache.for_dataset(model, dataset, tmp_path)
    assert again is not None and len(again.features) == 11 and again.start == 1


@pytest.mark.parametrize("n", [0, 3])
def test_cached_laplace_predictive_equals_the_full_forward(
    arc, smollm2_tokenizer, tmp_path, n
) -> None:
    """Laplace's GLM predictive differentiates through its forward; the backward stops at the
    first adapted block, so a prefix read from the cache must give the same Jacobian."""
    from torch.utils.data import DataLoader

    from blob_lora.methods.laplace import LaplaceLoRA
    from blob_lora.methods.laplace_method import (
        _head_mask,
        _make_lora_trainable,
        _option_logits_fn,
    )

    dataset, collator, option_ids = arc
    _, model = _model("lora", len(smollm2_tokenizer))
    _make_lora_trainable(model)
    la = LaplaceLoRA(model, _option_logits_fn(option_ids), head_mask_fn=_head_mask)
    la.fit(iter(DataLoader(dataset, batch_size=4, collate_fn=collator)))
    la.optimize_prior_precision()
    model.laplace_posterior = la
    method = get_method("laplace")
    assert method.prefix_cacheable
    args = (model, method, dataset, collator, option_ids, n, 4)
    torch.manual_seed(5)
    full, _ = samples_and_labels(*args, prefix_cache=False)
    torch.manual_seed(5)
    cached, _ = samples_and_labels(*args, prefix_cache=True, cache_dir=tmp_path)
    assert full.shape == cached.shape == (max(1, n), 11, 5)
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)
    # the posterior's variance really moved the predictive away from softmax(mean logits)
    mean_only, _ = samples_and_labels(
        model, get_method("lora"), dataset, collator, option_ids, 0, 4
    )
    assert (full.mean(0) - mean_only[0]).abs().max() > 1e-3
    assert len(list((tmp_path / "prefix").glob("*.safetensors"))) == 1


def test_damaged_or_foreign_disk_cache_is_rebuilt(arc, smollm2_tokenizer, tmp_path) -> None:
    dataset, collator, option_ids = arc
    method, model = _model("lora", len(smollm2_tokenizer))
    ref, _ = samples_and_labels(model, method, dataset, collator, option_ids, 0, 4)
    cache = PrefixFeatureCache.for_dataset(model, dataset, tmp_path)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable prefix cache"):
        got, _ = samples_and_labels(
            model,
            method,
            dataset,
            collator,
            option_ids,
            0,
            4,
            prefix_cache=True,
            cache_dir=tmp_path,
        )
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert len(load_file(str(cache.path))) == 11  # rewritten whole
    # other prefix weights -> another key: the file above is not used for them
    _, other = _model("lora", len(smollm2_tokenizer))
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = PrefixFeatureCache.for_dataset(other, dataset, tmp_path)
    assert fresh.key != cache.key and not fresh.features


def test_a_sliding_window_is_part_of_the_disk_key_and_no_window_keeps_the_old_key(
    arc, smollm2_tokenizer
) -> None:
    """Cloze features of a windowed model made before the window was cut into the packed mask
    are not reused; every other model's key is the one its caches already carry."""
    import hashlib

    dataset, _, _ = arc
    _, model = _model("lora", len(smollm2_tokenizer))
    plain = PrefixFeatureCache.for_dataset(model, dataset)
    start, dtype = plain.start, next(model.parameters()).dtype
    fp = prefix_fingerprint(model, start)
    old = f"{dataset.digest}:{fp}:{start}:{dtype}"
    assert plain.key == hashlib.sha256(old.encode()).hexdigest()
    model.config.sliding_window = 8
    assert PrefixFeatureCache.for_dataset(model, dataset).key != plain.key


def test_memory_limit_turns_the_cache_off(arc, smollm2_tokenizer) -> None:
    dataset, _, _ = arc
    _, model = _model("lora", len(smollm2_tokenizer))
    assert PrefixFeatureCache.for_dataset(model, dataset, limit_bytes=10**9) is not None
    assert PrefixFeatureCache.for_dataset(model, dataset, limit_bytes=100) is None


@pytest.mark.parametrize("method", ["lora", "blob"])
def test_training_with_the_cache_learns_the_same_adapter(
    tmp_path, data_root, tiny_model_dir, method
) -> None:
    def run(name: str, prefix_cache: bool) -> dict:
        cfg = TrainConfig(
            model=str(tiny_model_dir),
            task="arc_easy",
            method=method,
            data_root=str(data_root),
            train_split="train[:12]",
            out=str(tmp_path / name),
            batch_size=4,
            max_steps=6,
            lr=2e-2,
            max_length=96,
            target_modules=[TOP_BLOCK],
            evaluate=False,
            prefix_cache=prefix_cache,
            cache_dir=str(tmp_path / "cache"),
        )
        return train(cfg, progress=False)

    plain, cached = run("plain", False), run("cached", True)
    assert plain["prefix_cached_blocks"] == 0 and cached["prefix_cached_blocks"] == 1
    a = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cached" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) >= 5
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    # and the adapter moved: six steps at lr 2e-2 are not a no-op
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    assert len(list((tmp_path / "cache" / "prefix").glob("*.safetensors"))) == 1


def test_a_run_resumes_with_the_cache_switched(tmp_path) -> None:
    from blob_lora.training.run_dir import RUN_CONFIG, check_run_dir
    from blob_lora.utils.errors import ConfigError

    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_CONFIG).write_text(json.dumps(TrainConfig(prefix_cache=False).to_dict()))
    now = TrainConfig(prefix_cache=True, cache_dir=str(tmp_path / "c")).to_dict()
    assert check_run_dir(out, now, overwrite=False, resume=True) is True
    with pytest.raises(ConfigError, match=r"lr \(0.0001 -> 0.001\)"):
        check_run_dir(out, {**now, "lr": 1e-3}, overwrite=False, resume=True)


def test_abmll_layers_are_found_by_their_parameter_names() -> None:
    """ABMLL's four pairs (``lora_A`` / ``lora_B`` and ``lora_sigma_*``) mark their block as
    adapted, trainable (meta-training) or frozen (loaded for meta-evaluate) alike."""
    from peft import LoraConfig

    from blob_lora.tuners.abmll import AbmllConfig, get_abmll_model

    def abmll(targets):
        return get_abmll_model(tiny_llama(), LoraConfig(r=2, target_modules=targets), AbmllConfig())

    top = abmll(r".*\.layers\.1\.self_attn\.(q_proj|v_proj)")
    assert frozen_prefix_length(top) == 1
    for p in top.parameters():
        p.requires_grad_(False)
    assert frozen_prefix_length(top) == 1
    assert frozen_prefix_length(abmll(["q_proj", "v_proj"])) == 0


def _batch(seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0  # left padding, as the collator pads
    return {
        "input_ids": torch.randint(0, 128, (3, 9), generator=gen),
        "attention_mask": mask,
        "option_mask": torch.ones(3, 4, dtype=torch.bool),
        "labels": torch.tensor([0, 2, 1]),
    }


def _count_block0(model) -> list[int]:
    calls = [0]
    (layers,) = (m for n, m in model.named_modules() if n.endswith("model.layers"))
    layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_batch_prefix_cache_runs_the_frozen_blocks_once_per_batch() -> None:
    """Forwards (and gradients) from a batch's kept block output equal the full forward's,
    bit for bit, and the frozen block runs once per batch object, not once per forward."""
    import torch.nn.functional as F

    from blob_lora.models.forward import answer_logits
    from blob_lora.models.prefix_cache import BatchPrefixCache

    ids = torch.tensor([5, 6, 7, 8])

    def loss_and_grads(model, cache, batch):
        ctx = cache.injected(model, batch) if cache is not None else nullcontext()
        with ctx:
            loss = F.cross_entropy(answer_logits(model, batch, ids), batch["labels"])
        params = [p for p in model.parameters() if p.requires_grad]
        return loss.detach(), torch.autograd.grad(loss, params)

    model = lora(tiny_llama(), lora_dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    calls = _count_block0(model)
    batches = [_batch(3), _batch(4)]
    full = [loss_and_grads(model, None, b) for b in batches]
    assert calls[0] == 2
    cache = BatchPrefixCache()
    for _ in range(3):  # three "inner steps" over the same two batches
        for b, (loss, grads) in zip(batches, full, strict=True):
            got_loss, got_grads = loss_and_grads(model, cache, b)
            assert torch.equal(got_loss, loss)
            assert all(torch.equal(g, h) for g, h in zip(got_grads, grads, strict=True))
    assert calls[0] == 2 + 2 and len(cache) == 2 and cache.start == 1
    # a batch of equal content but another object is another batch: its own prefix pass
    loss_and_grads(model, cache, {k: v.clone() for k, v in batches[0].items()})
    assert calls[0] == 5 and len(cache) == 3


def test_batch_prefix_cache_runs_whole_where_there_is_no_frozen_prefix() -> None:
    """Adapters in the first block, or base-model dropout in a training forward: no prefix is
    deterministic, every forward runs every block and nothing is kept."""
    from blob_lora.models.forward import answer_logits
    from blob_lora.models.prefix_cache import BatchPrefixCache

    ids, batch = torch.tensor([5, 6, 7, 8]), _batch()
    everywhere = lora(tiny_llama(), ["q_proj", "v_proj"])
    calls, cache = _count_block0(everywhere), BatchPrefixCache()
    for _ in range(2):
        with cache.injected(everywhere, batch):
            answer_logits(everywhere, batch, ids)
    assert calls[0] == 2 and len(cache) == 0

    model = lora(tiny_llama())
    model.config.attention_dropout = 0.1
    calls, cache = _count_block0(model), BatchPrefixCache()
    model.train()
    for _ in range(2):
        with cache.injected(model, batch):
            answer_logits(model, batch, ids)
    assert calls[0] == 2 and len(cache) == 0
    model.eval()  # asked at every forward: in eval mode the prefix is deterministic again
    for _ in range(2):
        with cache.injected(model, batch):
            answer_logits(model, batch, ids)
    assert calls[0] == 3 and len(cache) == 1


def test_a_single_pass_keeps_one_batch_of_features_and_other_questions_stay_in_ram(
    arc, smollm2_tokenizer, tmp_path
) -> None:
    """``keep=False`` drops an example's features once its batch is assembled (the same
    output); questions that are no task split (no ``digest``) never go to ``cache_dir``."""
    from blob_lora.tasks.dataset import EncodedDataset, IndexedCollator, IndexedDataset

    dataset, collator, _ = arc
    _, model = _model("lora", len(smollm2_tokenizer))
    collate = IndexedCollator(collator)
    batch = collate([IndexedDataset(dataset)[i] for i in range(4)])
    index = batch.pop("index")
    kept = PrefixFeatureCache.for_dataset(model, dataset)
    once = PrefixFeatureCache.for_dataset(model, dataset, keep=False)
    assert torch.equal(once.output_for(model, batch, index), kept.output_for(model, batch, index))
    assert len(kept.features) == 4 and not once.features
    # a task split written to disk keeps its features until they are written, keep or not
    on_disk = PrefixFeatureCache.for_dataset(model, dataset, tmp_path, keep=False)
    assert on_disk.path is not None and on_disk.keep
    questions = EncodedDataset(dataset._enc)  # the same questions, as meta-evaluate holds them
    in_ram = PrefixFeatureCache.for_dataset(model, questions, tmp_path, keep=False)
    assert in_ram is not None and in_ram.path is None and not in_ram.keep
    assert torch.equal(in_ram.output_for(model, batch, index), kept.output_for(model, batch, index))
    assert not list(tmp_path.rglob("*.safetensors"))


def test_prediction_caches_questions_that_are_no_task_split(arc, smollm2_tokenizer) -> None:
    """``predict_dataset(prefix_cache=True)`` on in-memory questions (an ``EncodedDataset``,
    as meta-evaluate scores them) runs the frozen block once per batch, not per sample."""
    from blob_lora.tasks.dataset import EncodedDataset

    dataset, collator, option_ids = arc
    method, model = _model("blob", len(smollm2_tokenizer))
    questions = EncodedDataset(dataset._enc)
    calls = _count_block0(model)
    args = (model, method, questions, collator, option_ids, 4, 4)
    torch.manual_seed(5)
    full, _ = samples_and_labels(*args, fold=1, prefix_cache=False)
    assert calls[0] == 3 * 4  # 3 batches, 4 samples one at a time
    torch.manual_seed(5)
    cached, _ = samples_and_labels(*args, fold=1, prefix_cache=True)
    assert calls[0] == 12 + 3
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)
