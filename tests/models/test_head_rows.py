"""The cloze forward hands the output head only each row's predicting positions
(``models.forward.head_rows``): the same scores and gradients as the whole kept suffix, with
the head run on exactly the positions that are read."""

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
    """Records the shape of every input the model's output head ran on (a hook on its output,
    so it sees the input after any pre-hook changed it)."""

    def __init__(self, model: nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        head = model.get_output_embeddings()
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
        whole = cloze_logits(model, batch, gather_head=False)
        gathered = cloze_logits(model, batch)
    seen.close()
    torch.testing.assert_close(gathered, whole, rtol=0, atol=1e-5)
    suffix_shape, gathered_shape = seen.shapes
    needed = _needed_per_row(batch)
    assert gathered_shape[:2] == (len(examples), max(needed))
    # the whole suffix reaches back to the row that starts its scored span earliest
    assert suffix_shape[1] > gathered_shape[1]
    assert sum(needed) < suffix_shape[0] * suffix_shape[1]


def test_gathered_head_gives_the_same_gradients(tok) -> None:
    model = tiny_base(tok, seed=12)
    batch = _batch(MC, MC_EXAMPLES, tok, 3)
    grads = []
    for gather in (False, True):
        model.zero_grad()
        logits = answer_logits(model, batch, None, gather_head=gather)
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_gathered_head_keeps_one_blob_sample_per_row(tok) -> None:
    """BLoB draws one A per sequence in the head too: a folded 4-sample batch scores every
    sample the same with and without the gather (same seed, same draws)."""
    from peft import LoraConfig

    from blob_lora.methods import get_method
    from blob_lora.tuners.blob import BlobConfig, get_blob_model

    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False
    )
    model = get_blob_model(tiny_base(tok, seed=6), lora, BlobConfig(init_std=0.9, prior_std=1.0))
    model.eval()
    batch = repeat_batch(_batch(MC, MC_EXAMPLES, tok, 3), 4)
    method = get_method("blob")
    out = []
    for gather in (False, True):
        torch.manual_seed(5)
        with torch.no_grad(), method.sampling_mode(model, 1):
            out.append(cloze_logits(model, batch, gather_head=gather))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-5)
    # the copies of a question are scored by different samples
    assert (out[1][0] - out[1][3]).abs().max() > 1e-3


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
        want = cloze_logits(base, batch, gather_head=False)
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
        want = cloze_logits(model, batch, gather_head=False)
        got = cloze_logits(DataParallelLike(model), batch)
    seen.close()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert seen.shapes[1][1] == max(_needed_per_row(batch)) < seen.shapes[0][1]
