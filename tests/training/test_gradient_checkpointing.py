"""``--gradient-checkpointing``: the decoder blocks run again in the backward, and the run
learns exactly what it learns without it.

Why exactly: BLoB's weight noise, Bayesian-LoRA's samples and MC-dropout's masks are drawn in
the forward; a recomputation that drew them afresh would differentiate another sample than the
one the loss saw, a silent bias. Non-reentrant checkpointing restores the RNG state first.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from blob_lora.pipeline import train
from blob_lora.training.setup import enable_gradient_checkpointing
from blob_lora.utils.errors import ConfigError
from tests.factories import tiny_run_config

torch.set_num_threads(1)

#: a Bayesian method of each kind of forward noise, and plain LoRA
METHODS = {
    "blob": {},
    "bayesian-lora": {},
    "mc-dropout": {"lora_dropout": 0.3},
    "lora": {},
}


def trained(tmp_path, data_root, base, tok, method: str, checkpointing: bool):
    """(adapter tensors, calls of block 0's MLP) of a 3-step run of ``method``."""
    calls = [0]
    model = copy.deepcopy(base)

    def count(*_):
        calls[0] += 1

    # inside the block: transformers checkpoints the block's forward, so hooks on the block
    # itself run once, those of its modules again in the recomputation
    model.model.layers[0].mlp.register_forward_pre_hook(count)
    cfg = tiny_run_config(
        tmp_path / f"{method}-{checkpointing}",
        data_root,
        method,
        gradient_checkpointing=checkpointing,
        evaluate=False,
        **METHODS[method],
    )
    train(cfg, progress=False, base_model=model, tokenizer=tok)
    return load_file(
        tmp_path / f"{method}-{checkpointing}" / "adapter" / "adapter_model.safetensors"
    ), calls[0]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_same_adapter_with_the_blocks_run_twice(
    tmp_path, data_root, char_base, char_tok, method
) -> None:
    plain, plain_calls = trained(tmp_path, data_root, char_base, char_tok, method, False)
    ckpt, ckpt_calls = trained(tmp_path, data_root, char_base, char_tok, method, True)
    assert ckpt_calls == 2 * plain_calls  # every training forward of block 0 ran again
    assert plain.keys() == ckpt.keys()
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=0, atol=1e-7, msg=key)
    assert any(
        not torch.equal(plain[k], torch.zeros_like(plain[k])) for k in plain if "lora_B" in k
    )


def test_a_model_without_checkpointing_support_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not support transformers' activation"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


class _Base(torch.nn.Module):
    """A model that supports checkpointing under the old name only, or under both names."""

    supports_gradient_checkpointing = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict]] = []

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self.calls.append(("gradient", gradient_checkpointing_kwargs))


class _NewBase(_Base):
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None) -> None:
        self.calls.append(("activation", activation_checkpointing_kwargs))


@pytest.mark.parametrize(("base", "name"), [(_Base, "gradient"), (_NewBase, "activation")])
def test_the_name_the_installed_transformers_has_is_called_non_reentrant(base, name) -> None:
    """transformers 5.x renamed the call; an older one has only ``gradient_...``. Either way
    once, non-reentrant (the RNG restore the exact gradients rely on)."""
    model = base()
    enable_gradient_checkpointing(model)
    assert model.calls == [(name, {"use_reentrant": False})]
