"""The PEFT plumbing every custom-layer tuner (BLoB, Bayesian-LoRA, ABMLL) shares: wrap a base
model with the tuner's LoRA layers, save a folder atomically with the tuner's settings file,
and load one back only when every tensor fits.

Each tuner is PEFT's LoRA with its own ``nn.Linear`` replacement and a settings file
(``utils/options_file.py``) beside ``adapter_config.json``; what differs between them is the
layer class, the settings and a few checks, so those are the arguments here and the steps are
written once (a fault fixed here is fixed for all three).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from peft import LoraConfig, PeftModel, PeftModelForCausalLM, PeftModelForSequenceClassification
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from blob_lora.tuners.tied_weights import mark_shared_base_weights, without_tied_warnings
from blob_lora.utils.errors import CheckpointError, ConfigError, DamagedFileError
from blob_lora.utils.options_file import OptionsFile

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

L = TypeVar("L")
#: PEFT's model class per task type, the ones a custom tuner may wrap
_PEFT_TASK_CLASSES: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
}


class OptionsPeftMixin:
    """``save_pretrained`` for a PEFT model of a custom tuner: PEFT's folder plus each adapter's
    settings file (``OPTIONS_ATTR`` names the ``{adapter: settings}`` attribute), atomically."""

    OPTIONS_ATTR: ClassVar[str]

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write a standard PEFT adapter folder plus the tuner's settings file; every file is
        renamed into place (:func:`atomic_save_pretrained`)."""
        options: Mapping[str, OptionsFile] = getattr(self, self.OPTIONS_ATTR)

        def write_options(folder: Path, adapter: str) -> None:
            if adapter in options:
                options[adapter].save(folder)

        atomic_save_pretrained(
            super().save_pretrained,  # type: ignore[misc]
            save_directory,
            kwargs,
            list(self.peft_config),  # type: ignore[attr-defined]
            write_options,
        )

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """PEFT's ``merge_and_unload``; a tied base weight merges into a copy of its own
        (``tied_weights``), so PEFT's warning about merging tied modules is not shown. The
        shared weights are looked up again first: an adapter added after the build
        (``add_adapter``) may have wrapped a tied module that the build never saw."""
        mark_shared_base_weights(self)  # type: ignore[arg-type]
        with without_tied_warnings():
            return self.base_model.merge_and_unload(*args, **kwargs)  # type: ignore[attr-defined]

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """PEFT's ``merge_adapter``, without its tied-module warning (as ``merge_and_unload``)."""
        mark_shared_base_weights(self)  # type: ignore[arg-type]
        with without_tied_warnings():
            self.base_model.merge_adapter(*args, **kwargs)  # type: ignore[attr-defined]


def atomic_save_pretrained(
    save: Callable[..., None],
    save_directory: str | os.PathLike[str],
    kwargs: dict[str, Any],
    adapters: list[str],
    write_extra: Callable[[Path, str], None],
) -> None:
    """Run PEFT's ``save`` (a ``save_pretrained``) so that an interrupted save never leaves a
    truncated file behind, and add each adapter's own files with ``write_extra(folder, name)``.

    PEFT writes into a temporary sibling folder first; each file is then renamed into place.
    """
    kwargs.setdefault("safe_serialization", True)
    # The frozen base weights never change under LoRA; PEFT would otherwise copy a targeted
    # lm_head (vocab x hidden) into every adapter folder.
    kwargs.setdefault("save_embedding_layers", False)
    if not kwargs["safe_serialization"]:
        raise ValueError(
            "BLoB, Bayesian-LoRA and ABMLL adapters are saved with safetensors only (no pickle)"
        )
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        save(tmp, **kwargs)
        selected = kwargs.get("selected_adapters") or adapters
        for adapter in selected:
            sub = Path(tmp) if adapter == "default" else Path(tmp) / adapter
            if sub.is_dir():
                write_extra(sub, adapter)
        for src in sorted(Path(tmp).rglob("*")):
            if src.is_file():
                dst = target / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(src, dst)


# --- building -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CustomTuner:
    """What makes a custom tuner on PEFT, declared once in its ``model.py``: its name in
    messages, its PEFT model classes (``mixin``, its ``OptionsPeftMixin``, put before PEFT's:
    ``<prefix>PeftModel`` and ``<prefix>PeftModelFor<Task>`` per task type) and its layers:
    ``linear(base_layer, adapter, **{options_keyword: options}, ...)`` for every targeted
    ``nn.Linear``, or ``layers(options)``, the layer class per base module type (BLoB's
    bitsandbytes layers). A tuner without such layers (``quantised_layers`` false) refuses a
    quantised base."""

    method: str
    mixin: type
    prefix: str
    linear: type | None = None
    options_keyword: str = ""
    layers: Callable[[Any], dict[type, Any]] | None = None
    task_types: tuple[str, ...] = ("CAUSAL_LM",)
    quantised_layers: bool = False

    def layer_classes(self, options: Any) -> dict[type, Any]:
        """What PEFT injects per base module type, given the tuner's settings: the tuner's
        layers, and its ``nn.Linear`` layer on transformers' ``Conv1D`` too (GPT-2's attention
        and MLP projections), as PEFT's own LoRA does (``conv1d_layer``)."""
        if self.layers is not None:
            mapping = dict(self.layers(options))
        else:
            mapping = {nn.Linear: functools.partial(self.linear, **{self.options_keyword: options})}
        if nn.Linear in mapping:
            mapping.setdefault(Conv1D, conv1d_layer(mapping[nn.Linear]))
        return mapping

    def model_class(self, task_type: str | None) -> type[PeftModel]:
        """The PEFT model class for ``task_type`` (``<prefix>PeftModel`` for another one)."""
        base = _PEFT_TASK_CLASSES[task_type] if task_type in self.task_types else PeftModel
        return _model_class(self.mixin, self.prefix, base)

    def build(
        self, model: nn.Module, lora_config: LoraConfig, options: Any, adapter_name: str
    ) -> PeftModel:
        """Wrap ``model`` in the tuner's PEFT model, PEFT injecting ``layer_classes(options)``
        for every targeted module, with ``options`` (validated) under the class's
        ``OPTIONS_ATTR``. Adapters are kept in float32 whatever the base dtype. A layer whose
        base weight is shared (a tied ``lm_head``) merges into a copy of it (``tied_weights``),
        so PEFT's warning about merging tied modules does not apply and is not shown."""
        check_plain_lora(lora_config, self.method)
        options.validate()
        if not self.quantised_layers:
            refuse_quantised_base(model, self.method)
        mapping = self.layer_classes(options)
        lora_config._register_custom_module(mapping)
        task_type = getattr(lora_config.task_type, "value", lora_config.task_type)
        cls = self.model_class(task_type)
        with without_tied_warnings():
            peft_model = cls(
                model, lora_config, adapter_name=adapter_name, autocast_adapter_dtype=True
            )
        self._refuse_foreign_layers(peft_model, mapping)
        mark_shared_base_weights(peft_model)
        setattr(peft_model, cls.OPTIONS_ATTR, {adapter_name: options})  # type: ignore[attr-defined]
        return peft_model

    def _refuse_foreign_layers(self, peft_model: nn.Module, mapping: dict[type, Any]) -> None:
        """``ConfigError`` when a targeted module got PEFT's own LoRA layer instead of the
        tuner's: PEFT falls back to it for every base module type the tuner has no layer for
        (an ``nn.Embedding``, a convolution), and that module would then train as plain,
        deterministic LoRA inside a model the user asked to be Bayesian, silently."""
        ours = tuple(_layer_class(v) for v in mapping.values())
        foreign = [
            (name, type(module.get_base_layer()).__name__)
            for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and not isinstance(module, ours)
        ]
        if foreign:
            shown = ", ".join(f"{name} ({kind})" for name, kind in foreign[:5])
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            kinds = ", ".join(sorted(_type_name(t) for t in mapping))
            raise ConfigError(
                f"{self.method} has layers for {kinds} modules only; --target-modules also "
                f"matches {shown}{more}: leave those out of --target-modules"
            )


def _layer_class(factory: Any) -> type:
    """The class a ``layer_classes`` value builds (a class, a ``functools.partial`` of one, or
    a ``conv1d_layer`` wrapper of either)."""
    while not isinstance(factory, type):
        factory = factory.func if isinstance(factory, functools.partial) else factory.builds
    return factory


def _type_name(t: type) -> str:
    """``torch.Linear``, ``transformers.Conv1D``: the class and the package it comes from."""
    return f"{t.__module__.split('.')[0]}.{t.__name__}"


def conv1d_layer(linear: Any) -> Callable[..., nn.Module]:
    """A tuner's ``nn.Linear`` layer factory made to wrap transformers' ``Conv1D``, whose weight
    is stored transposed (``in x out``): PEFT's LoRA ``Linear`` handles that with
    ``fan_in_fan_out`` (merging transposes the delta) and ``is_target_conv_1d_layer``, and its
    default dispatch sets both for a ``Conv1D``; a custom layer gets them here, on a copy of the
    LoRA settings, so the ``nn.Linear`` layers of the same model keep ``fan_in_fan_out=False``.
    The adapter's own ``A`` and ``B`` are ``nn.Linear`` either way, so the tuner's sampling and
    KL are unchanged."""

    def build(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any):
        conv_config = copy.copy(config)
        conv_config.fan_in_fan_out = True
        return linear(
            target, adapter_name, config=conv_config, is_target_conv_1d_layer=True, **kwargs
        )

    build.builds = linear  # type: ignore[attr-defined]
    return build


@functools.cache
def _model_class(mixin: type, prefix: str, base: type[PeftModel]) -> type[PeftModel]:
    """``<prefix><base name>``: ``mixin`` before ``base``; one class per triple, so that
    ``isinstance`` and pickling see the same class every time."""
    doc = f"A ``{base.__name__}`` with the layers of ``{mixin.__module__}``."
    return type(
        prefix + base.__name__, (mixin, base), {"__module__": mixin.__module__, "__doc__": doc}
    )


def custom_layers(model: nn.Module, kind: type[L]) -> Iterator[tuple[str, L]]:
    """Every module of ``model`` that is a ``kind`` (a tuner's layer mixin), with its name."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


@contextmanager
def layer_attributes(layers: Sequence[nn.Module], **values: Any) -> Iterator[None]:
    """Within the block every layer of ``layers`` has the attributes ``values``; on exit, also
    after an error, each gets back its own. Why one helper: every tuner switches its layers
    this way (sampling on or off, the sample mode, the noise kind), and a restore that missed a
    layer or an attribute would leave a model sampling after its block ended."""
    saved = [{name: getattr(layer, name) for name in values} for layer in layers]
    try:
        for layer in layers:
            for name, value in values.items():
                setattr(layer, name, value)
        yield
    finally:
        for layer, old in zip(layers, saved, strict=True):
            for name, value in old.items():
                setattr(layer, name, value)


def check_plain_lora(lora_config: LoraConfig, method: str) -> None:
    """Refuse what no custom tuner is defined on: a non-``LoraConfig`` and DoRA."""
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    if lora_config.use_dora:
        raise ConfigError(f"{method} is defined on plain LoRA; use_dora=True is not supported")


def refuse_quantised_base(model: nn.Module, method: str) -> None:
    """``ConfigError`` for a base with bitsandbytes layers (their 4/8-bit weights are not what
    an ``nn.Linear`` LoRA layer expects) in a tuner that has no quantised layer class."""
    quantised = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}
    )
    if quantised:
        raise ConfigError(
            f"{method} does not support quantised bases ({', '.join(quantised)}): load the "
            "base without --load-in-4bit / --load-in-8bit (float32 or --dtype bfloat16)"
        )


# --- loading --------------------------------------------------------------------------------


def load_adapter_folder(
    base_model: nn.Module,
    directory: str | os.PathLike[str],
    options_class: type[OptionsFile],
    build: Callable[[nn.Module, LoraConfig, Any, str], PeftModel],
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    check_state: Callable[[dict[str, torch.Tensor], Path], None] | None = None,
) -> PeftModel:
    """Restore a saved adapter of a custom tuner onto ``base_model`` exactly.

    ``build(base, lora_config, options, adapter_name)`` makes the empty model; every saved
    tensor must then find its place with the same shape (``check_adapter_fits``), so another
    base model or a truncated file raises ``CheckpointError`` instead of loading half an
    adapter. ``check_state(state, directory)`` may refuse the tensors before anything is built.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DamagedFileError(f"adapter folder {directory} does not exist")
    try:
        lora_config = LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise DamagedFileError(
            f"{directory / ADAPTER_CONFIG} is missing or corrupt: {exc}"
        ) from exc
    options = options_class.load(directory)
    lora_config.inference_mode = not is_trainable
    state = read_adapter_weights(directory)
    if check_state is not None:
        check_state(state, directory)
    model = build(base_model, lora_config, options, adapter_name)
    check_adapter_fits(model, state, directory, adapter_name)
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if not is_trainable:
        model.eval()
    return model


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter folder (``adapter_model.safetensors``), by PEFT key.

    Any adapter folder, BLoB or plain PEFT LoRA: the methods check a loaded adapter against it
    and TFB rotates a LoRA adapter's weights. Refuses a pickled ``adapter_model.bin``, a
    missing file and a corrupt one with ``CheckpointError``.
    """
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{directory} holds a pickled adapter_model.bin; blob-lora loads safetensors only"
            )
        raise DamagedFileError(f"{path} not found: not an adapter folder")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DamagedFileError(f"{path} is corrupt or unreadable: {exc}") from exc


def check_adapter_fits(
    model: PeftModel, state: dict[str, torch.Tensor], directory: Path, adapter_name: str
) -> None:
    """Raise ``CheckpointError`` unless every saved tensor finds its place in ``model`` with the
    same shape and none is missing (another base model, a truncated file)."""
    expected = adapter_state_shapes(model, adapter_name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: saved {tuple(state[k].shape)}, model {tuple(expected[k])}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            details.append(
                "shape mismatch (adapter made for another base model?): "
                + "; ".join(sorted(mismatched)[:5])
            )
        if missing:
            details.append(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"adapter in {directory} does not fit this model: " + " | ".join(details)
        )


def adapter_state_shapes(model: PeftModel, adapter_name: str) -> dict[str, torch.Size]:
    """The shape of every tensor PEFT would save for ``adapter_name`` of ``model``, by the key
    ``read_adapter_weights`` returns: what a saved adapter must hold to fit this model."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    return {k: v.shape for k, v in state.items()}
