"""The rows Accelerate adds to an epoch's last micro-batches so every process gets a full one.

Accelerate shards a training loader over processes round-robin (global batch ``j`` goes to
process ``j mod W``) and, with its default ``even_batches``, completes the epoch's last round
with examples from the epoch's start: the short batch is filled up, and a process with no batch
left gets one made of such examples. Trained on as they come, those rows count twice in the
epoch's last step, where one process at the same global batch takes the short batch as it is.
They are always the rows past the training set's end in the round-robin order, so which rows
of this process's last micro-batch are examples follows from the set's size alone.

Why by arithmetic and not by looking at the indices: a repeated index may have been seen by
another process; recognising it would take a gather every step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LastBatch:
    """This process's last micro-batch of an epoch when the round holds added rows.

    Attributes:
        rows: the micro-batch's size (``--batch-size``).
        real: how many of its rows, from the first, are examples (0 on a process whose whole
            batch was added).
        divisor: what its NLL sum is divided by, the round's examples over the processes:
            averaged over the processes by the gradient's all-reduce, the step's NLL is then
            the mean over the round's examples, as one process's short batch gives.
    """

    rows: int
    real: int
    divisor: float


def last_batch(
    n_train: int, batch_size: int, world_size: int, rank: int, micro_per_epoch: int
) -> LastBatch | None:
    """The epoch's last micro-batch of process ``rank`` (``None``: no row of it was added, as
    on one process or when ``n_train`` is a multiple of ``world_size x batch_size``)."""
    if world_size == 1 or n_train % (world_size * batch_size) == 0:
        return None
    in_round = n_train - (micro_per_epoch - 1) * world_size * batch_size
    real = min(batch_size, max(0, in_round - rank * batch_size))
    return LastBatch(rows=batch_size, real=real, divisor=in_round / world_size)
