"""The cloze forward hands the output head only each row's predicting positions
(``models.forward.head_rows``), and with ``head_positions="flat"`` its vocabulary matrix only the
positions that are read: the same scores and gradients as the whole kept suffix."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from blob_lora.models.forward import answer_logits, cloze_logits, head_plan, repeat_batch
from blob_lora.tasks import MCExample
from blob_lora.tasks.dataset import MCCollator, encode_cloze_examples
from tests.factories import tiny_base, tiny_tokenizer

MC = SimpleNamespace(name="mc", style="mc")
WG = SimpleNamespace(name="wg", style="winogrande")

# questions and options of very different lengths, so rows' scored spans differ in a batch
MC_EXAMPLES = [
    MCExample("a", "What is red?", ("apple", "the clear blue sky at noon", "grass"), 0),
    MCExample("b", "Which is cold and " + "very " * 12 + "hard?", ("ice", "fire", "sun"), 0),
    MCExample("c", "Pick one.", ("a b c d e f g h", "i", "j k"), 2, context="Some words."),
]
WG_EXAMPLES = [
    MCExample("w1", "The cup fell because _ was heavy.", ("the cup", "the big old table"), 0),
    MCExample("w2", "Tom told Bob that _ had won the long race.", ("Tom", "Bob"), 1),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _batch(task, examples, tok, n_options):
    items, _ = encode_cloze_examples(task, examples, tok, 600, "none")
    for it, ex in zip(items, examples, strict=True):
        it.update(label=ex.label, n_options=ex.n_options)
    return MCCollator(tok.pad_token_id, n_options)(items)


class _HeadInputs:
    """Records the shape of every input the model's output head (or, ``base=True``, the
    layer under its adapter) ran on (a hook on its output, so it sees the input after any
    pre-hook changed it)."""

    def __init__(self, model: nn.Module, base: bool = False) -> None:
        self.shapes: list[tuple[int, ...]] = []
        head = model.get_output_embeddings()
        if base and hasattr(head, "get_base_layer"):
            head = head.get_base_layer()
        self._handle = head.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.shapes.append(tuple(args[0].shape))

    def close(self) -> None:
        self._handle.remove()


def _needed_per_row(batch) -> list[int]:
    """By hand: the distinct positions whose logits predict a scored token, per row."""
    target, offset = batch["target_option"], batch["prev_offset"]
    out = []
    for r in range(target.shape[0]):
        cols = (target[r] >= 0).nonzero().flatten().tolist()
        out.append(len({c - int(offset[r, c]) for c in cols}))
    return out


@pytest.mark.parametrize("task,examples,n_options", [(MC, MC_EXAMPLES, 3), (WG, WG_EXAMPLES, 2)])
def test_gathered_head_gives_the_same_scores_on_fewer_positions(
    tok, task, examples, n_options
) -> None:
    model = tiny_base(tok, seed=11)
    batch = _batch(task, examples, tok, n_options)
    seen = _HeadInputs(model)
    with torch.no_grad():
        whole = cloze_logits(model, batch, head_positions="suffix")
        gathered = cloze_logits(model, batch, head_positions="rows")
        flat = cloze_logits(model, batch)
    seen.close()
    torch.testing.assert_close(gathered, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(flat, whole, rtol=0, atol=1e-5)
    suffix_shape, gathered_shape, flat_shape = seen.shapes
    needed = _needed_per_row(batch)
    assert gathered_shape[:2] == (len(examples), max(needed))
    # the whole suffix reaches back to the row that starts its scored span earliest
    assert suffix_shape[1] > gathered_shape[1]
    assert sum(needed) < suffix_shape[0] * suffix_shape[1]
    # an unadapted head is its own vocabulary matrix: flat, it runs on the read positions only
    assert flat_shape == (sum(needed), suffix_shape[2])
    assert sum(needed) < len(examples) * max(needed)  # the rows' spare slots were dropped


def _adapted(tok, seed: int, method: str = "lora") -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from blob_lora.tuners.blob import BlobConfig, get_blob_model

    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False
    )
    base = tiny_base(tok, seed=seed)
    if method == "blob":
        return get_blob_model(base, lora, BlobConfig(init_std=0.9, prior_std=1.0))
    return get_peft_model(base, lora)


@pytest.mark.parametrize("task,examples,n_options", [(MC, MC_EXAMPLES, 3), (WG, WG_EXAMPLES, 2)])
def test_flat_head_runs_the_vocabulary_matrix_on_the_read_positions_only(
    tok, task, examples, n_options
) -> None:
    """An adapted head: its ``lora_A`` keeps the (B, K) rows, the base layer under it and its
    ``lora_B`` get exactly the T positions that are read, the model's logits are (T, V), and
    the scores are those of the whole suffix."""
    model = _adapted(tok, seed=15)
    batch = _batch(task, examples, tok, n_options)
    head = model.get_output_embeddings()
    on_head, on_base = _HeadInputs(model), _HeadInputs(model, base=True)
    seen: dict[str, list[tuple[int, ...]]] = {"A": [], "B": [], "logits": []}
    hooks = [
        head.lora_A["default"].register_forward_hook(lambda m, a, o: seen["A"].append(a[0].shape)),
        head.lora_B["default"].register_forward_hook(lambda m, a, o: seen["B"].append(a[0].shape)),
        head.register_forward_hook(lambda m, a, o: seen["logits"].append(o.shape)),
    ]
    with torch.no_grad():
        whole = cloze_logits(model, batch, head_positions="suffix")
        flat = cloze_logits(model, batch, head_positions="flat")
    for h in hooks:
        h.remove()
    on_head.close()
    on_base.close()
    torch.testing.assert_close(flat, whole, rtol=0, atol=1e-5)
    needed = _needed_per_row(batch)
    hidden, vocab = on_head.shapes[0][2], seen["logits"][0][2]
    assert on_head.shapes[1] == (len(examples), max(needed), hidden)
    assert seen["A"][1] == (len(examples), max(needed), hidden)
    assert on_base.shapes[1] == (sum(needed), hidden)
    assert seen["B"][1] == (sum(needed), 4)
    assert seen["logits"][1] == (sum(needed), vocab)


def test_a_head_that_computes_its_own_product_keeps_its_rows(tok) -> None:
    """A LoRA variant (DoRA) whose forward does not add up ``lora_B``'s output and says
    nothing of its parts: ``flat`` leaves its rows alone (the head returns (B, K, V)) and the
    scores stay the same."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], use_dora=True,
                      init_lora_weights=False)  # fmt: skip
    model = get_peft_model(tiny_base(tok, seed=19), lora)
    batch = _batch(WG, WG_EXAMPLES, tok, 2)
    seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with torch.no_grad():
        whole = cloze_logits(model, batch, head_positions="suffix")
        flat = cloze_logits(model, batch, head_positions="flat")
    hook.remove()
    torch.testing.assert_close(flat, whole, rtol=0, atol=1e-5)
    assert seen[1][:2] == (len(WG_EXAMPLES), max(_needed_per_row(batch)))


def _bayesian_lora(tok, **options) -> nn.Module:
    """``options``: ``BayesianLoraConfig`` fields (``layers``: which targets are Bayesian)."""
    from peft import LoraConfig

    from blob_lora.tuners.bayesian_lora import BayesianLoraConfig, get_bayesian_lora_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                      init_lora_weights=False)  # fmt: skip
    model = get_bayesian_lora_model(tiny_base(tok, seed=19), lora, BayesianLoraConfig(**options))
    torch.manual_seed(0)
    with torch.no_grad():  # a mean that is not zero, so the adapter's part is in the logits
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("mode", [None, "shared", "independent"])
def test_bayesian_lora_head_runs_its_vocabulary_matrix_on_the_read_positions(tok, mode) -> None:
    """Bayesian-LoRA multiplies the factors it draws itself, and names its parts
    (``flat_parts``): flat, its base layer gets the T read positions and the head returns
    (T, V), while its factors are still drawn per (B, K) row, so under one seed the sampled
    scores equal those of the whole suffix and of the per-row gather (``None``: mean weights)."""
    from blob_lora.tuners.bayesian_lora import sampling

    model = _bayesian_lora(tok)
    batch = _batch(MC, MC_EXAMPLES, tok, 3)
    on_base = _HeadInputs(model, base=True)
    logits_shapes = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, a, o: logits_shapes.append(o.shape))
    scores = {}
    with torch.no_grad(), sampling(model, mode is not None, mode):
        for where in ("suffix", "rows", "flat"):
            torch.manual_seed(3)
            scores[where] = cloze_logits(model, batch, head_positions=where)
    hook.remove()
    on_base.close()
    torch.testing.assert_close(scores["rows"], scores["suffix"], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores["flat"], scores["suffix"], rtol=0, atol=1e-5)
    needed = _needed_per_row(batch)
    assert on_base.shapes[1] == (len(MC_EXAMPLES), max(needed), on_base.shapes[0][2])
    assert on_base.shapes[2] == (sum(needed), on_base.shapes[0][2])
    assert logits_shapes[2] == (sum(needed), logits_shapes[0][2])
    if mode is not None:  # the draws matter: another seed gives other scores
        with torch.no_grad(), sampling(model, True, mode):
            torch.manual_seed(4)
            other = cloze_logits(model, batch)
        assert (other - scores["flat"]).abs().max() > 1e-4  # 10x the tolerance above


def test_bayesian_lora_head_names_its_parts_only_when_they_are_all_its_own(tok) -> None:
    """Merged or disabled, only the base layer runs (flat); with a plain LoRA adapter active
    beside the Bayesian one, PEFT's forward would run that adapter's ``lora_B`` on the rows, so
    the head says nothing (None) and ``flat`` keeps them."""
    model = _bayesian_lora(tok)
    head = model.get_output_embeddings()
    assert head.flat_parts() == [head.get_base_layer(), head.bl_adapter_output]
    with model.disable_adapter():
        assert head.flat_parts() == [head.get_base_layer()]
    head.merge()
    assert head.flat_parts() == [head.get_base_layer()]
    head.unmerge()
    head.lora_A["plain"] = nn.Linear(head.in_features, 4, bias=False)
    head.set_adapter(["default", "plain"])
    assert head.flat_parts() is None


def test_a_plain_head_of_a_bayesian_lora_model_cuts_as_peft_lora_does(tok) -> None:
    """A head outside ``BayesianLoraConfig.layers`` is a plain LoRA layer: flat, its base layer
    and its ``lora_B`` get the read positions (PEFT's own LoRA head's parts) and the scores
    equal the whole suffix's, while the Bayesian q_proj layers still draw their weights."""
    from blob_lora.tuners.bayesian_lora import bayesian_lora_layers, sampling

    model = _bayesian_lora(tok, layers=r".*q_proj")
    head = model.get_output_embeddings()
    assert not head.is_bayesian() and len(list(bayesian_lora_layers(model))) > 0
    assert head.flat_parts() == [head.get_base_layer(), head.lora_B["default"]]
    batch = _batch(MC, MC_EXAMPLES, tok, 3)
    on_base = _HeadInputs(model, base=True)
    scores = {}
    with torch.no_grad(), sampling(model, True, "independent"):
        for where in ("suffix", "flat"):
            torch.manual_seed(3)
            scores[where] = cloze_logits(model, batch, head_positions=where)
    on_base.close()
    torch.testing.assert_close(scores["flat"], scores["suffix"], rtol=0, atol=1e-5)
    assert on_base.shapes[1] == (sum(_needed_per_row(batch)), on_base.shapes[0][2])


def test_gathered_head_gives_the_same_gradients(tok) -> None:
    model = tiny_base(tok, seed=12)
    batch = _batch(MC, MC_EXAMPLES, tok, 3)
    grads = []
    for where in ("suffix", "rows", "flat"):
        model.zero_grad()
        logits = answer_logits(model, batch, None, head_positions=where)
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads[2][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_flat_head_gives_the_same_adapter_gradients(tok) -> None:
    """Through an adapted head (LoRA on ``lm_head`` and q/v), as in training."""
    model = _adapted(tok, seed=16)
    batch = _batch(WG, WG_EXAMPLES, tok, 2)
    grads = []
    for where in ("suffix", "flat"):
        model.zero_grad()
        logits = answer_logits(model, batch, None, head_positions=where)
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert any("lm_head" in n for n in grads[0]) and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_flat_bayesian_lora_head_gives_the_same_gradients(tok) -> None:
    """Training draws one sample for the whole forward (``shared``): under one seed the
    inducing weights of the head and of q get the gradients of the whole suffix."""
    from blob_lora.tuners.bayesian_lora import sampling

    model = _bayesian_lora(tok)
    batch = _batch(WG, WG_EXAMPLES, tok, 2)
    grads = []
    with sampling(model, True, "shared"):
        for where in ("suffix", "flat"):
            model.zero_grad()
            torch.manual_seed(5)
            logits = answer_logits(model, batch, None, head_positions=where)
            torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
            grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            )
    assert any("lm_head.lora_inducing" in n for n in grads[0])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_gathered_head_keeps_one_blob_sample_per_row(tok) -> None:
    """BLoB draws one A per sequence in the head too: a folded 4-sample batch scores every
    sample the same with and without the gather and the flat base (same seed, same draws)."""
    from blob_lora.methods import get_method

    model = _adapted(tok, seed=6, method="blob")
    model.eval()
    batch = repeat_batch(_batch(MC, MC_EXAMPLES, tok, 3), 4)
    method = get_method("blob")
    out = []
    for where in ("suffix", "rows", "flat"):
        torch.manual_seed(5)
        with torch.no_grad(), method.sampling_mode(model, 1):
            out.append(cloze_logits(model, batch, head_positions=where))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2], out[0], rtol=0, atol=1e-5)
    # the copies of a question are scored by different samples
    assert (out[2][0] - out[2][3]).abs().max() > 1e-3


def test_blob_head_names_its_parts_and_its_vocabulary_matrix_gets_the_read_positions(tok):
    """BLoB's head names its parts (``flat_parts``): the base layer and the active ``lora_B``;
    flat, both get the T read positions while the path into ``A`` (where the std enters; its
    dropout is the module it calls when sampling) keeps the (B, K) rows. Merged or disabled, the base layer alone; with DoRA active, nothing (PEFT
    computes that product itself), so ``flat`` would keep its rows."""
    from blob_lora.methods import get_method

    model = _adapted(tok, seed=6, method="blob")
    head = model.get_output_embeddings()
    assert head.flat_parts() == [head.get_base_layer(), head.lora_B["default"]]
    batch = _batch(MC, MC_EXAMPLES, tok, 3)
    on_base = _HeadInputs(model, base=True)
    seen: dict[str, list[tuple[int, ...]]] = {"A": [], "B": []}
    hooks = [
        head.lora_dropout["default"].register_forward_hook(
            lambda m, a, o: seen["A"].append(a[0].shape)
        ),
        head.lora_B["default"].register_forward_hook(lambda m, a, o: seen["B"].append(a[0].shape)),
    ]
    with torch.no_grad(), get_method("blob").sampling_mode(model, 1):
        cloze_logits(model, batch, head_positions="flat")
    for h in hooks:
        h.remove()
    on_base.close()
    needed = _needed_per_row(batch)
    assert on_base.shapes == [(sum(needed), head.in_features)]
    assert seen["A"][0][:2] == (len(MC_EXAMPLES), max(needed))
    assert seen["B"][0] == (sum(needed), 4)
    with model.disable_adapter():
        assert head.flat_parts() == [head.get_base_layer()]
    head.merge()
    assert head.flat_parts() == [head.get_base_layer()]
    head.unmerge()
    head.use_dora["default"] = True
    assert head.flat_parts() is None


def test_head_plan_lists_each_rows_positions_once_and_maps_every_entry() -> None:
    rows = torch.tensor([0, 0, 0, 2, 2, 1])
    at = torch.tensor([5, 3, 5, 0, 7, 2])
    plan = head_plan(rows, at, batch_size=3)
    assert plan.index.tolist() == [[3, 5], [2, 2], [0, 7]]  # row 1's spare slot repeats 2
    assert torch.equal(plan.index[rows, plan.slot], at)


def test_a_head_that_sees_an_unexpected_input_is_left_alone(tok) -> None:
    """A model whose head is not fed the kept suffix (B, keep, H) gets no gather: the caller
    reads the logits as they come."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return nn.Linear(2, 2)  # never called by the forward

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    base = tiny_base(tok, seed=13)
    batch = _batch(MC, MC_EXAMPLES, tok, 3)
    with torch.no_grad():
        want = cloze_logits(base, batch, head_positions="suffix")
        got = cloze_logits(Wrapper(base), batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_head_is_found_through_a_distributed_wrapper(tok) -> None:
    """Under DDP the forward gets ``DistributedDataParallel(model)``, which has no
    ``get_output_embeddings``: the head is looked up through ``.module`` and still gathered."""

    class DataParallelLike(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    model = tiny_base(tok, seed=14)
    batch = _batch(WG, WG_EXAMPLES, tok, 2)
    seen = _HeadInputs(model)
    with torch.no_grad():
        want = cloze_logits(model, batch, head_positions="suffix")
        got = cloze_logits(DataParallelLike(model), batch, head_positions="rows")
    seen.close()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert seen.shapes[1][1] == max(_needed_per_row(batch)) < seen.shapes[0][1]


def test_an_unknown_head_positions_value_is_refused(tok) -> None:
    model = tiny_base(tok, seed=17)
    batch = _batch(MC, MC_EXAMPLES, tok, 3)
    with pytest.raises(ValueError, match="head_positions"):
        cloze_logits(model, batch, head_positions="gathered")  # type: ignore[arg-type]


def _suffix_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return answer_logits(model, batch, None, head_positions="suffix")


def test_laplace_predictive_is_the_same_on_the_rows_positions(tok) -> None:
    """Laplace-LoRA predicts on each row's positions: the linearised logits' mean and
    covariance are those of the whole suffix (a position whose logits are not read has a zero
    output gradient, so it adds nothing to the Jacobian)."""
    pytest.importorskip("blob_lora.methods.laplace")
    from blob_lora.methods.laplace import LaplaceLoRA
    from blob_lora.methods.laplace_method import (
        _head_mask,
        _make_lora_trainable,
        _option_logits_fn,
    )

    model = _adapted(tok, seed=18)
    _make_lora_trainable(model)
    batch = _batch(MC, MC_EXAMPLES, tok, 3)
    la = LaplaceLoRA(model, _option_logits_fn(None), head_mask_fn=_head_mask)
    la.fit([batch])
    rows = la.predictive_logit_moments(batch)
    la.logits_fn = _suffix_logits
    suffix = la.predictive_logit_moments(batch)
    torch.testing.assert_close(rows[0], suffix[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(rows[1], suffix[1], rtol=1e-4, atol=1e-6)
    assert rows[1].diagonal(dim1=1, dim2=2).min() > 0  # a real spread, on every option


def test_laplace_fit_does_not_depend_on_which_questions_share_a_batch(tok) -> None:
    """The fit counts the head's read positions only: the same questions fitted in one batch
    or one by one give the same posterior. Counting the whole kept suffix (the fit before)
    did not: a row's unread suffix positions are set by the batch's widest row."""
    pytest.importorskip("blob_lora.methods.laplace")
    from blob_lora.methods.laplace import LaplaceLoRA
    from blob_lora.methods.laplace_method import (
        _head_mask,
        _make_lora_trainable,
        _option_logits_fn,
    )

    model = _adapted(tok, seed=21)
    _make_lora_trainable(model)
    together = [_batch(MC, MC_EXAMPLES, tok, 3)]
    alone = [_batch(MC, [ex], tok, 3) for ex in MC_EXAMPLES]

    def evidence(batches, **kw) -> float:
        la = LaplaceLoRA(model, **kw)
        la.fit(batches)
        return la.log_marginal_likelihood(1.0)

    now = {"logits_fn": _option_logits_fn(None), "head_mask_fn": _head_mask}
    a, b = evidence(together, **now), evidence(alone, **now)
    assert abs(a - b) <= 1e-6 * abs(a)
    before = {"logits_fn": _suffix_logits}
    c, d = evidence(together, **before), evidence(alone, **before)
    assert abs(c - d) > 1e-3 * abs(c)
    assert abs(a - c) > 1e-3 * abs(a)  # the head's factors changed


def test_a_model_that_reshapes_the_flat_logits_gets_a_clear_error(tok) -> None:
    """The flat head hands the model (T, V) logits; a model whose forward reshapes them
    afterwards cannot be read by position, and says so instead of scoring wrong slots."""

    class Reshaping(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = out.logits.unsqueeze(0)
            return out

    model = Reshaping(tiny_base(tok, seed=20))
    batch = _batch(MC, MC_EXAMPLES, tok, 3)
    with torch.no_grad(), pytest.raises(RuntimeError, match="head_positions='rows'"):
        cloze_logits(model, batch)
