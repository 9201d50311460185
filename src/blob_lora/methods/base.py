"""What a fine-tuning method adds to the shared harness.

The harness (tasks, training loop, checkpoints, metrics) is the same for every method; a method
only says how to wrap the base model, whether a KL term enters the loss, and how to draw
predictive samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from blob_lora.methods.io import load_plain_adapter
from blob_lora.models.forward import answer_logits, repeat_batch

REGEX_CHARS = set("*()|[]\\")


def target_modules_arg(targets: list[str]) -> list[str] | str:
    """PEFT's form: a list of name suffixes, or one regular expression (full match)."""
    if len(targets) == 1 and REGEX_CHARS & set(targets[0]):
        return targets[0]
    return list(targets)


class Method:
    """Plain LoRA (maximum likelihood); other methods override what differs."""

    name = "lora"
    has_kl = False
    samples_by_default = 0  # N when the user does not ask for a number
    #: Whether every call of ``predict_samples`` draws fresh, independent samples, so that they
    #: may be drawn a few at a time (early-stopped prediction). False for a fixed sample set
    #: such as an ensemble's members.
    iid_samples = False
    #: Whether evaluation may start forwards at the first adapted block from cached hidden
    #: states (``blob_lora.models.prefix_cache``); True for every method whose predictive
    #: reads (or differentiates, as Laplace's GLM does) the adapted blocks only, however many
    #: samples it folds into the batch. A method that needs the frozen blocks' own forward
    #: (e.g. gradients to the input embeddings) must set it False.
    prefix_cacheable = True

    def lora_config(self, cfg: Any) -> LoraConfig:
        return LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=self.lora_dropout(cfg),
            target_modules=target_modules_arg(cfg.target_modules),
            task_type="CAUSAL_LM",
        )

    def lora_dropout(self, cfg: Any) -> float:
        return cfg.lora_dropout

    def weight_decay(self, cfg: Any) -> float:
        return cfg.weight_decay

    def build(self, base: nn.Module, cfg: Any) -> PeftModel:
        return get_peft_model(base, self.lora_config(cfg))

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        return load_plain_adapter(base, adapter_dir)

    def kl(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def eval_samples(self, model: nn.Module, requested: int | None) -> int:
        return self.samples_by_default if requested is None else requested

    @contextmanager
    def mean_mode(self, model: nn.Module) -> Iterator[None]:
        """Put the model in its deterministic (N = 0) state; plain LoRA already is."""
        yield

    @contextmanager
    def sampling_mode(self, model: nn.Module, n_samples: int) -> Iterator[None]:
        """Put the model in the state that draws one predictive sample per sequence."""
        yield

    def stochastic_modules(self, model: nn.Module) -> list[str] | None:
        """Qualified names of the modules whose forward is random under ``sampling_mode``.

        Prediction may then run everything before the first of them once and reuse it for all
        samples (``blob_lora.prediction``). ``None`` means unknown: the whole forward is random.
        """
        return None

    @torch.no_grad()
    def predict_samples(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        option_ids: torch.Tensor | None,
        n_samples: int,
        fold: int | None = None,
    ) -> torch.Tensor:
        """(S, B, C) option probabilities; S = max(1, n_samples).

        With ``fold`` > 1 that many samples share one forward (sample index folded into the
        batch), which is much faster than a loop where memory allows.
        """
        model.eval()
        n = max(1, n_samples)
        if n_samples == 0:
            with self.mean_mode(model):
                return torch.softmax(answer_logits(model, batch, option_ids), -1).unsqueeze(0)
        fold = max(1, min(fold or n, n))
        chunks = []
        with self.sampling_mode(model, n_samples):
            done = 0
            while done < n:
                k = min(fold, n - done)
                logits = answer_logits(model, repeat_batch(batch, k), option_ids)
                chunks.append(torch.softmax(logits, -1).view(k, -1, logits.shape[-1]))
                done += k
        return torch.cat(chunks)
