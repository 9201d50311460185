"""``--length-chunks``: a micro-batch forwarded in chunks of similar length is the same step.

Each chunk is cut to its own longest row (``tasks.dataset.split_by_length``) and the chunks'
summed NLLs are the micro-batch's mean, so deterministic LoRA must end on the same adapter as
with the whole batch, to float rounding, under both scorings and with the frozen-prefix cache;
BLoB's KL term must enter once per micro-batch, not once per chunk.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from blob_lora.pipeline import train
from tests.training.test_train_loop import tiny_cfg

# deterministic LoRA, 4 Adam steps at lr 2e-2, one thread: only the summation order differs.
# Measured 1.05e-5 on one machine's CPU (below 1e-5 on earlier ones): Adam divides by second
# moments that are tiny at step 1, which magnifies rounding. A chunk weighted wrongly moves
# the gradient's direction, and the adapter by the order of lr (1e-2), far above this.
PARAM_ATOL = 5e-5
#: LoRA on block 1 and the head: block 0 is a frozen prefix, served by the cache
TOP_BLOCK = [r".*layers\.1\.self_attn\.(q_proj|v_proj)", "lm_head"]


def _run(tmp_path, data_root, tiny_model_dir, name: str, **kw) -> tuple[list[dict], dict]:
    settings = dict(train_split="train[:16]", batch_size=8, max_steps=4, evaluate=False)
    settings.update(kw)
    cfg = tiny_cfg(tmp_path / name, data_root, tiny_model_dir, **settings)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, progress=False)
    finally:
        torch.set_num_threads(saved)
    run = tmp_path / name / "run"
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return log, load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(
    ("scoring", "targets"),
    [("cloze", None), ("letter", None), ("cloze", TOP_BLOCK)],
    ids=["cloze", "letter", "cloze-prefix-cache"],
)
def test_chunked_micro_batches_take_the_same_steps(
    tmp_path, data_root, tiny_model_dir, scoring, targets
) -> None:
    kw = {"method": "lora", "scoring": scoring}
    if targets is not None:
        kw["target_modules"] = targets
    log_1, adapter_1 = _run(tmp_path, data_root, tiny_model_dir, "one", **kw)
    for chunks in (3, 8):  # 8: a chunk per example, no padding at all
        log_k, adapter_k = _run(
            tmp_path, data_root, tiny_model_dir, f"k{chunks}", length_chunks=chunks, **kw
        )
        for a, b in zip(log_1, log_k, strict=True):
            assert math.isclose(a["nll"], b["nll"], rel_tol=1e-5), (a, b)
            assert a["acc"] == b["acc"]
        assert _max_diff(adapter_1, adapter_k) <= PARAM_ATOL
    assert log_1[-1]["nll"] != log_1[0]["nll"]  # the steps moved the adapter


def test_blob_adds_its_kl_once_per_micro_batch(tmp_path, data_root, tiny_model_dir) -> None:
    """BLoB with its std held at ~1e-8 (std lr 1e-12) is deterministic to float rounding: the
    chunked run must match the whole-batch run, which it would not if every chunk added the
    (here dominant, 25 x mean per element) KL gradient again."""
    kw = dict(
        method="blob", optimizer="single", std_lr=1e-12, init_std=1e-8, kl_schedule="geometric",
        kl_rescale=False, scoring="cloze",
    )  # fmt: skip
    log_1, adapter_1 = _run(tmp_path, data_root, tiny_model_dir, "one", **kw)
    log_3, adapter_3 = _run(tmp_path, data_root, tiny_model_dir, "three", length_chunks=3, **kw)
    assert [r["pi"] for r in log_1] == [r["pi"] for r in log_3] and log_1[0]["pi"] > 0
    for a, b in zip(log_1, log_3, strict=True):
        assert math.isclose(a["kl"], b["kl"], rel_tol=1e-5)
        assert math.isclose(a["nll"], b["nll"], rel_tol=1e-4)
    means = [k for k in adapter_1 if "lora_A" in k and "std" not in k]
    assert means
    assert max(float((adapter_1[k] - adapter_3[k]).abs().max()) for k in means) <= 1e-4


def test_a_diverging_chunked_run_stops_with_a_clear_error(tmp_path, data_root, tiny_model_dir):
    """A loss gone non-finite in any chunk stops the run before the step is taken."""
    from blob_lora.training.loop import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf|-inf) at step \d+ .*--lr"):
        _run(tmp_path, data_root, tiny_model_dir, "boom", method="lora", length_chunks=3,
             lr=1e30, max_steps=6)  # fmt: skip


def test_one_chunk_loss_is_the_mean_bit_for_bit() -> None:
    """The loop writes every micro-batch's NLL as a sum over its chunks divided by the batch
    size; with one chunk that must be the mean cross-entropy of runs made before chunks
    existed, bit for bit, in value and gradient (so a resumed old run takes the same steps)."""
    import torch.nn.functional as F

    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        n, c = (
            int(torch.randint(1, 17, (1,), generator=g)),
            int(torch.randint(2, 6, (1,), generator=g)),
        )
        x = (torch.randn(n, c, generator=g) * 30).requires_grad_()
        y = torch.randint(0, c, (n,), generator=g)
        mean = F.cross_entropy(x, y)
        (g_mean,) = torch.autograd.grad(mean, x)
        summed = F.cross_entropy(x, y, reduction="sum") / n
        (g_sum,) = torch.autograd.grad(summed, x)
        assert torch.equal(mean, summed) and torch.equal(g_mean, g_sum), seed
