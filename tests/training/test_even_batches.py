"""``training.even_batches`` against Accelerate's own sharding: for every layout, the rows it
calls examples are exactly those Accelerate's ``BatchSamplerShard`` gives out before the
training set ends in the round-robin order, and the rest are its added repeats."""

from __future__ import annotations

import itertools

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler

from blob_lora.training.even_batches import last_batch


def _shards(n: int, batch: int, world: int) -> list[list[list[int]]]:
    """Each process's micro-batches of one epoch, as Accelerate hands them out."""
    sampler = BatchSampler(SequentialSampler(range(n)), batch, drop_last=False)
    return [
        list(BatchSamplerShard(sampler, world, rank, split_batches=False, even_batches=True))
        for rank in range(world)
    ]


@pytest.mark.parametrize(
    ("n", "batch", "world"),
    [(n, b, w) for n, b, w in itertools.product((1, 5, 7, 10, 16, 23), (1, 2, 3, 4), (1, 2, 3))],
)
def test_the_examples_of_the_last_round_are_the_ones_before_the_sets_end(n, batch, world):
    shards = _shards(n, batch, world)
    micro = len(shards[0])
    assert all(len(s) == micro for s in shards)  # even batches: every process as many
    # the round-robin order: the first n positions are the epoch's examples, each once
    order = [i for k in range(micro) for rank in range(world) for i in shards[rank][k]]
    assert sorted(order[:n]) == list(range(n))
    in_last_round = sum(1 for pos in range((micro - 1) * world * batch, len(order)) if pos < n)
    for rank in range(world):
        last = last_batch(n, batch, world, rank, micro)
        rows = shards[rank][-1]
        start = ((micro - 1) * world + rank) * batch  # its last batch's first position
        real = sum(1 for pos in range(start, start + len(rows)) if pos < n)
        if last is None:  # nothing added: the batch is all examples (or one process)
            assert world == 1 or real == len(rows) == batch
            continue
        assert (last.rows, last.real) == (len(rows), real)
        assert last.divisor == pytest.approx(in_last_round / world)


def _bucketed_shards(n: int, batch: int, world: int, short_last: bool, epoch: int):
    from blob_lora.tasks.dataset import LengthBucketedBatchSampler

    lengths = [(7 * i) % 11 for i in range(n)]  # some ties, some order
    shards = []
    for rank in range(world):
        sampler = LengthBucketedBatchSampler(
            lengths, batch, seed=3, pool_factor=2, short_last=short_last
        )
        sampler.set_epoch(epoch)
        shards.append(list(BatchSamplerShard(sampler, world, rank, even_batches=True)))
    return shards


@pytest.mark.parametrize(("n", "batch", "world"), [(10, 4, 2), (23, 3, 2), (23, 2, 3), (7, 2, 3)])
def test_length_buckets_on_several_processes_give_every_example_once(n, batch, world):
    """``--bucket-by-length`` on several processes: its short batch last, Accelerate hands out
    every batch, and the added rows are again the ones past the set's end."""
    for epoch in range(4):
        shards = _bucketed_shards(n, batch, world, short_last=True, epoch=epoch)
        micro = len(shards[0])
        assert all(len(s) == micro == -(-n // (batch * world)) for s in shards)
        order = [i for k in range(micro) for rank in range(world) for i in shards[rank][k]]
        assert sorted(order[:n]) == list(range(n))
        for rank in range(world):
            last = last_batch(n, batch, world, rank, micro)
            start = ((micro - 1) * world + rank) * batch
            real = sum(1 for pos in range(start, start + batch) if pos < n)
            assert last is not None and last.real == real
    # the short batch where the shuffle put it: some epoch loses a whole round of examples
    lost = [
        set(range(n))
        - {i for s in _bucketed_shards(n, batch, world, False, e) for b in s for i in b}
        for e in range(4)
    ]
    assert any(lost)


def test_a_bucketed_epoch_is_new_each_epoch_and_resumes_on_another_process_count() -> None:
    """Two defects of ``--bucket-by-length`` on several processes: Accelerate passed the epoch
    only to a ``sampler`` below its ``BatchSamplerShard``, so every epoch repeated epoch 0's
    batches (``set_loader_epoch`` reaches the bucketed sampler itself); and with the short
    batch moved last on several processes only, one process had another order, so a resume on
    another process count skipped other examples than it had trained on."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from blob_lora.tasks.dataset import length_bucketed_sampler
    from blob_lora.training.setup import set_loader_epoch

    n, batch = 11, 2
    lengths = [(5 * i) % 7 for i in range(n)]

    def loader(world: int, rank: int):
        sampler = length_bucketed_sampler(lengths, batch, seed=1, pool_factor=2, short_last=True)
        plain = DataLoader(list(range(n)), batch_sampler=sampler, collate_fn=list)
        return prepare_data_loader(
            plain, num_processes=world, process_index=rank, put_on_device=False
        )

    def epoch_rows(world: int, epoch: int) -> list[list[list[int]]]:
        shards = []
        for rank in range(world):
            dl = loader(world, rank)
            set_loader_epoch(dl, epoch)
            shards.append([list(b) for b in dl])
        return shards

    two = [epoch_rows(2, e) for e in range(3)]
    assert two[0] != two[1] != two[2]  # a new order every epoch
    for e in range(3):
        (one,) = epoch_rows(1, e)
        # 1 process at batch 2 x accumulation 2 and 2 processes at batch 2: after k global
        # steps both have met the same examples, so a resume either way skips those exactly
        for k in range(1, len(two[e][0])):
            met_one = {i for b in one[: 2 * k] for i in b}
            met_two = {i for rank in range(2) for b in two[e][rank][:k] for i in b}
            assert met_one == met_two


def test_the_training_loader_puts_the_bucketed_short_batch_last_every_epoch(
    tmp_path, data_root, tiny_model_dir
) -> None:
    """What the sampler-level tests above assume of the training loader itself: its bucketed
    batches end with the short one in every epoch, also on one process (one order for every
    process count), and each epoch's order is new."""
    from accelerate import Accelerator

    from blob_lora.tasks import get_task, task_inputs
    from blob_lora.training.config import TrainConfig
    from blob_lora.training.setup import load_tokenizer_of, set_loader_epoch, training_loader

    cfg = TrainConfig(
        model=str(tiny_model_dir), task="arc_easy", data_root=str(data_root),
        train_split="train[:10]", batch_size=4, bucket_by_length=True, out=str(tmp_path / "r"),
    )  # fmt: skip
    task = get_task(cfg.data.task, data_root=cfg.data.data_root)
    inputs = task_inputs(task, "train[:10]", load_tokenizer_of(cfg), 96)
    loader = training_loader(cfg, inputs, Accelerator(cpu=True))
    orders = []
    for epoch in range(4):
        set_loader_epoch(loader, epoch)
        batches = [b["index"].tolist() for b in loader]
        assert [len(b) for b in batches] == [4, 4, 2]
        orders.append(batches)
    assert len({str(o) for o in orders}) > 1
