"""The optimiser-step loop on ``accelerate.Accelerator``: one CPU, one GPU or many processes.

Loss per optimiser step: mean NLL over the (global) batch + pi_i * KL. Under DDP every process
holds the same adapter, so the KL and its weight are identical everywhere while the NLL
gradient is averaged across processes: 2 processes at batch b optimise the same objective as
1 process at batch 2b (Accelerate hands process k the k-th of every ``world`` consecutive
batches of the seeded order, so the global batches hold the same examples too). The KL cycle
is computed from the global batch, and the KL gradient is taken with ``autograd.grad`` so that
no DDP all-reduce averages a term that is already identical on every process. With
``--grad-accum`` the NLL is the mean over the micro-batches of the window; the last window of
an epoch may hold fewer (``micro_per_epoch % grad_accum``) and is averaged over those it holds,
so its step equals one step on a batch of those examples (it is still one step of the KL cycle).
With ``--length-chunks K`` each micro-batch is forwarded as K chunks of similar length
(``tasks.dataset.split_by_length``) whose NLLs sum to the micro-batch's mean: the same gradient
with less padding, up to float rounding; weight noise and dropout masks are drawn per chunk
(BLoB's ``shared`` flipout then draws K samples per micro-batch, not one).

Every decision that must be collective is made collectively: the stop on SIGINT/SIGTERM, a
non-finite loss, and the success of each checkpoint write (written by the main process only).
Checkpoints record the data position in examples, so a run may be resumed on another number
of processes with the same global batch (``--batch-size``/``--grad-accum`` adjusted).

Under FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2``) every parameter, the frozen base
and the adapter alike, is a DTensor shard. The same loop then holds: the KL is computed on the
shards and summed across processes once (DTensor arithmetic; before the forward, when every
parameter is a shard), its gradient lands on each shard directly while FSDP reduce-scatters
and averages the NLL gradient into the same ``.grad``; checkpoints and the saved adapter hold
whole tensors (gathered on every process, written by the main one), so a run resumes on any
number of processes with or without FSDP. FSDP1 and DeepSpeed are refused
(``training.distributed.check_launch``), as are a quantised base and fp16 under FSDP.

Why a module of its own: the step, its logging window and the checkpoint writer share the run's
position; what is built before the first step is ``training.setup``'s, putting a checkpoint back
``training.restore``'s, and ``training.trainer`` assembles the run from the three.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader

from blob_lora.methods.base import Method, StepSchedule
from blob_lora.models.forward import answer_logits
from blob_lora.models.prefix_cache import PrefixFeatureCache
from blob_lora.tasks import MCDataset
from blob_lora.tasks.dataset import split_by_length
from blob_lora.training import checkpoint as ckpt
from blob_lora.training.config import TrainConfig
from blob_lora.training.distributed import (
    all_true,
    gather_rng,
    on_main,
    reduce_window,
)
from blob_lora.training.even_batches import last_batch
from blob_lora.training.optim import Updater
from blob_lora.training.restore import restore_checkpoint
from blob_lora.training.run_dir import CHECKPOINTS, TRAIN_LOG, truncate_log
from blob_lora.training.setup import StepPlan, set_loader_epoch
from blob_lora.training.signals import StopSignals, TrainingInterrupted
from blob_lora.utils.dtensor import full_tensors
from blob_lora.utils.errors import BlobLoraError

if TYPE_CHECKING:
    from accelerate import Accelerator


class TrainingDiverged(BlobLoraError):
    """The loss became NaN or infinite."""


class LearningCurve(Protocol):
    """Scores the model on held-out data during training (``--curve-every``).

    The pipeline builds it (``blob_lora.evaluation.curve``), so the loop itself evaluates
    nothing; the loop only calls ``record`` and trims ``path`` on resume.
    """

    path: Path

    def record(self, model: nn.Module, step: int, epoch: int) -> Any: ...


class TrainingLoop:
    """The optimiser-step loop of one run: its position, logging window and checkpoints.

    Why a class: the position (step, epoch, micro-batch), the resumed training time and the
    logging window are shared by the step, the checkpoint writer and the final save.

    The step's sections carry ``torch.profiler`` labels (``train.forward``, ``train.backward``,
    ``train.update`` with ``train.update.kl``, ``train.kl``, ``train.log``), so that a profile
    of a real run says where its time goes (``bench/train_full_step.py --profile``); without
    an active profiler they cost nothing measurable.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        method: Method,
        accelerator: Accelerator,
        model: nn.Module,
        updater: Updater,
        loader: DataLoader,
        option_ids: torch.Tensor | None,
        plan: StepPlan,
        curve: LearningCurve | None,
    ) -> None:
        self.cfg, self.method, self.accelerator = cfg, method, accelerator
        self.model, self.unwrapped = model, accelerator.unwrap_model(model)
        self.updater, self.loader, self.option_ids = updater, loader, option_ids
        self.plan, self.curve = plan, curve
        self.schedule = StepSchedule(plan.total_steps, plan.steps_per_epoch)
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / CHECKPOINTS
        self.log_path = self.out / TRAIN_LOG
        self.step, self.epoch, self.micro_done = 0, 0, 0
        self.seconds_before = 0.0  # training time of earlier sittings of a resumed run
        self.layout = {
            "world_size": accelerator.num_processes,
            "batch_size": cfg.loop.batch_size,
            "grad_accum": cfg.loop.grad_accum,
            "global_batch": plan.global_batch,
        }
        self.prefix: PrefixFeatureCache | None = None
        self.window: dict[str, float] = {"nll": 0.0, "correct": 0.0, "n": 0.0, "micro": 0.0}
        self.signals = StopSignals()

    def start(self, resuming: bool, dataset: MCDataset, progress: bool) -> None:
        """Restore a checkpoint, open trackers and logs, and build the frozen-prefix cache."""
        cfg, accelerator = self.cfg, self.accelerator
        #: what the run trains on; a checkpoint records it, and resuming on other data is refused
        self.train_data = dataset.task.source_fingerprint(dataset.split)
        if resuming:
            self.step, self.epoch, self.micro_done, self.seconds_before = restore_checkpoint(
                self.ckpt_root,
                self.unwrapped,
                self.updater,
                accelerator,
                self.layout,
                self.method,
                train_data=self.train_data,
                bucketed=bool(cfg.data.bucket_by_length),
            )
        if cfg.loop.log_with:
            accelerator.init_trackers("blob-lora", config=_flat_config(cfg))
        self.trainable = {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        if accelerator.is_main_process:
            truncate_log(self.log_path, self.step)
            if self.curve is not None:
                truncate_log(self.curve.path, self.step)
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.plan.total_steps,
            initial=self.step,
            desc=f"train {cfg.method}",
            disable=not (progress and accelerator.is_local_main_process),
        )
        self.model.train()
        # Frozen blocks below the first adapter run once per example, not once per epoch (one
        # process only: each process would need the features of its own shard).
        if cfg.base.prefix_cache and accelerator.num_processes == 1:
            self.prefix = PrefixFeatureCache.for_dataset(
                self.unwrapped, dataset, cfg.data.cache_dir
            )
            if resuming and self.prefix is not None:
                self._refill_prefix()
        #: the epoch's last micro-batch when Accelerate added rows to it (``even_batches``;
        #: ``--bucket-by-length`` puts its short batch last, so that its batches are handed
        #: out in the same round-robin order)
        self.last = last_batch(
            len(dataset),
            cfg.loop.batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            self.plan.micro_per_epoch,
        )
        self.started = time.perf_counter()

    def _refill_prefix(self) -> None:
        """Compute the frozen-prefix features of the examples the run met before its
        checkpoint in the batches (and ``--length-chunks`` chunks) where it first met them,
        epoch 0's. Why: an example's features carry the float rounding of the padding of the
        batch that computed them, so computed later, in other batches, they would make the
        resumed run differ from an uninterrupted one in the last bits (a review measured
        1.3e-7 in the adapter) where the README promises the same bits. It is the forward the
        run would otherwise make when it meets them again; the data position and every random
        stream are left as the checkpoint restored them."""
        assert self.prefix is not None
        met = self.plan.micro_per_epoch if self.epoch > 0 else self.micro_done
        if met == 0:
            return
        saved = ckpt.rng_state()  # a loader's iterator draws its base seed from torch's stream
        try:
            set_loader_epoch(self.loader, 0)
            # the whole epoch is iterated (collation only past ``met``), so the prepared
            # loader's begin/end bookkeeping stays paired
            for micro, batch in enumerate(self.loader):
                if micro >= met:
                    continue
                for chunk in split_by_length(batch, self.cfg.loop.length_chunks):
                    self.prefix.fill(self.unwrapped, chunk, chunk.pop("index"))
        finally:
            ckpt.set_rng_state(saved)

    def save(self, step: int, epoch: int, micro: int) -> None:
        """Checkpoint the adapter, optimiser, RNG streams and data position (main process)."""
        cfg, accelerator = self.cfg, self.accelerator
        states = gather_rng(accelerator)
        # whole tensors: under FSDP every process takes part in gathering its shards
        trainable = full_tensors(self.trainable)
        optim = full_tensors(self.updater.state_dict())
        method_state = self.method.training_state(self.unwrapped)
        loop_state = {
            "epoch": epoch,
            "micro_in_epoch": micro,
            # world-size independent position: examples of this epoch already consumed
            "examples_in_epoch": micro * cfg.loop.batch_size * accelerator.num_processes,
            # summed over sittings, so a resumed run reports its whole training cost
            "train_seconds": self.seconds_before + time.perf_counter() - self.started,
            "train_data": self.train_data,
            **self.layout,
        }
        on_main(
            accelerator,
            lambda: ckpt.save_checkpoint(
                self.ckpt_root,
                step,
                trainable,
                optim,
                states,
                loop_state,
                method_state=method_state,
            ),
        )

    def run(self) -> None:
        """Optimiser steps until ``total_steps``, epoch after epoch, from the restored position."""
        with self.signals:
            for _ in self.steps():
                pass

    def steps(self) -> Iterator[int]:
        """Take the optimiser steps, yielding the step number after each one (with its
        logging and checkpoint); ``run`` takes them all under the signal handlers."""
        accelerator, total_steps = self.accelerator, self.plan.total_steps
        while self.step < total_steps:
            set_loader_epoch(self.loader, self.epoch)
            micro_done = self.micro_done
            batches = (
                accelerator.skip_first_batches(self.loader, micro_done)
                if micro_done
                else self.loader
            )
            micro = micro_done
            for batch in batches:
                micro += 1
                before = self.step
                if self._micro_step(batch, micro, self.signals):
                    break  # the last step: yielded below, once the position is recorded
                if self.step != before:
                    yield self.step
            else:
                self.epoch += 1
                self.micro_done = 0
                continue
            at_epoch_end = micro == self.plan.micro_per_epoch
            self.epoch, self.micro_done = (
                (self.epoch + 1, 0) if at_epoch_end else (self.epoch, micro)
            )
            yield self.step

    def _micro_step(self, batch: dict[str, torch.Tensor], micro: int, signals: StopSignals) -> bool:
        """Forward and backward one micro-batch (in ``--length-chunks`` chunks of similar
        length), and step the optimiser at a boundary; True once the last step is done."""
        cfg, accelerator, method = self.cfg, self.accelerator, self.method
        boundary = micro % cfg.loop.grad_accum == 0 or micro == self.plan.micro_per_epoch
        pi = self.plan.schedule.weight(self.step + 1) if method.has_kl else 0.0
        kl_value = None
        if method.has_kl and self.updater.mode == "single":
            # before the forward: under FSDP every parameter is then a shard (after it the
            # head's are still gathered), and the KL is summed over the shards once
            with record_function("train.kl"):
                kl_value = full_tensors(method.kl(self.unwrapped))
        n = len(batch["labels"])
        # the NLL is a sum over the micro-batch's examples divided by its size, or, in an epoch's
        # last micro-batch that Accelerate filled up, over the examples it holds divided by
        # the round's examples per process (``training.even_batches``): the added rows count 0
        divisor: float = n
        examples = n
        added = self.last if micro == self.plan.micro_per_epoch else None
        if added is not None and n == added.rows:
            batch["example"] = torch.arange(n, device=batch["labels"].device) < added.real
            divisor, examples = added.divisor, added.real
        chunks = split_by_length(batch, cfg.loop.length_chunks)
        # read once after the chunks: one device sync per micro-batch, not one per chunk
        losses: list[torch.Tensor] = []
        nll_total: torch.Tensor | float = 0.0
        correct: torch.Tensor | int = 0
        for j, chunk in enumerate(chunks):
            last = j == len(chunks) - 1
            # gradients are synchronised once per optimiser step: on the last chunk of the
            # window's last micro-batch
            sync = nullcontext() if boundary and last else accelerator.no_sync(self.model)
            index = chunk.pop("index")
            example = chunk.pop("example", None)
            with sync:
                prefix = self.prefix
                with (
                    prefix.injected(self.unwrapped, chunk, index) if prefix else nullcontext(),
                    record_function("train.forward"),
                ):
                    logits = answer_logits(self.model, chunk, self.option_ids)
                # the micro-batch's mean NLL, summed over its chunks (one chunk: bit for bit
                # the mean of runs made before chunks existed); the KL once
                if example is None:
                    nll = F.cross_entropy(logits, chunk["labels"], reduction="sum") / n
                else:
                    per_row = F.cross_entropy(logits, chunk["labels"], reduction="none")
                    nll = (per_row * example).sum() / divisor
                loss = nll if kl_value is None or j > 0 else nll + pi * kl_value
                losses.append(loss.detach())
                if last:
                    self._stop_if_not_finite(torch.stack(losses))
                # mean over the micro-batches of this window: the last window of an epoch may
                # hold fewer than --grad-accum, and its NLL must not be shrunk against pi * KL
                with record_function("train.backward"):
                    accelerator.backward(loss / self._window_size(micro))
            nll_total = nll_total + nll.detach()
            hits = logits.argmax(-1) == chunk["labels"]
            correct = correct + (hits if example is None else hits & example).sum()
        self.window["nll"] += float(nll_total)
        self.window["correct"] += int(correct)
        self.window["micro"] += 1
        self.window["n"] += examples
        if not boundary:
            return False
        self._optimizer_step(kl_value, pi, micro, signals)
        return self.step >= self.plan.total_steps

    def _stop_if_not_finite(self, losses: torch.Tensor) -> None:
        """Stop the run on every process alike if a loss of this micro-batch is not finite: one
        collective decision, before the backward that synchronises the gradients."""
        finite = torch.isfinite(losses)
        if all_true(self.accelerator, bool(finite.all())):
            return
        bad = losses[~finite]  # empty when only another process diverged
        value = (bad[0] if len(bad) else losses[-1]).item()
        raise TrainingDiverged(
            f"loss became {value} at step {self.step + 1} (on at least one process); the last "
            f"good checkpoint is kept in {self.ckpt_root} (lower --lr or check the data)"
        )

    def _window_size(self, micro: int) -> int:
        """How many micro-batches the accumulation window of the 1-based ``micro`` holds:
        ``--grad-accum``, or the remainder for the last window of an epoch."""
        grad_accum = self.cfg.loop.grad_accum
        first = (micro - 1) // grad_accum * grad_accum  # micro-batches before this window
        return min(grad_accum, self.plan.micro_per_epoch - first)

    def _optimizer_step(
        self, kl_value: torch.Tensor | None, pi: float, micro: int, signals: StopSignals
    ) -> None:
        """One optimiser step: update, log, record the curve, checkpoint, stop on a signal."""
        cfg, method, unwrapped = self.cfg, self.method, self.unwrapped
        kl_fn = (lambda: full_tensors(method.kl(unwrapped))) if method.has_kl else None
        with record_function("train.update"):
            used_kl = self.updater.step(kl_fn, pi)
        if kl_value is None:
            kl_value = used_kl
        self.step += 1
        step = self.step
        # before the curve and any checkpoint of this step: both see what the method kept
        method.after_step(unwrapped, cfg, step, self.schedule)
        # totals over every process: the logged NLL is the mean over the global batch
        totals, stop = reduce_window(self.accelerator, self.window, signals.received is not None)
        record = {
            "step": step,
            "epoch": self.epoch,
            "nll": totals["nll"] / totals["micro"],
            "acc": totals["correct"] / max(1.0, totals["n"]),
            "kl": float(torch.as_tensor(kl_value).detach()) if kl_value is not None else None,
            "pi": pi,
            "lr": self.updater.optimizers[0].param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        self.window = dict.fromkeys(self.window, 0.0)
        with record_function("train.log"):
            self._report(record)
        at_epoch_end = micro == self.plan.micro_per_epoch
        position = (self.epoch + 1, 0) if at_epoch_end else (self.epoch, micro)
        total_steps = self.plan.total_steps
        if self.curve is not None and (
            step % cfg.evaluation.curve_every == 0 or step >= total_steps
        ):
            self.curve.record(unwrapped, step, self.epoch)
        if (
            cfg.loop.checkpoint_every
            and step % cfg.loop.checkpoint_every == 0
            and step < total_steps
        ):
            self.save(step, *position)
        if stop:  # decided together: every process saves the same step
            self.save(step, *position)
            what = f"signal {signals.received}" if signals.received else "a signal"
            raise TrainingInterrupted(
                f"stopped by {what} after step {step}; checkpoint saved in "
                f"{self.ckpt_root}, continue with --resume (blob-lora compare: run the same "
                "command again)"
            )

    def _report(self, record: dict[str, Any]) -> None:
        """Show a step on the progress bar, append it to the train log and the trackers."""
        cfg, accelerator = self.cfg, self.accelerator
        self.bar.update(1)
        self.bar.set_postfix(
            nll=f"{record['nll']:.3f}",
            kl=f"{record['kl']:.1f}" if record["kl"] is not None else "-",
            pi=f"{record['pi']:.2e}",
            acc=f"{record['acc']:.2f}",
        )
        if accelerator.is_main_process and record["step"] % cfg.loop.log_every == 0:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.loop.log_with:
            accelerator.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def finish(self) -> float:
        """Close the bar, keep the prefix features and write the final checkpoint; return the
        training seconds of all sittings."""
        self.bar.close()
        train_seconds = self.seconds_before + time.perf_counter() - self.started
        if self.prefix is not None:
            on_main(self.accelerator, self.prefix.save)
        self.save(self.step, self.epoch, self.micro_done)
        return train_seconds


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, int | float | str | bool) else str(v))
        for k, v in cfg.to_dict().items()
    }
