"""Helpers shared by the scripts in ``bench/``: import path, machine info, timing, peak memory.

Kept free of anything but the standard library, torch and (optionally) psutil, so that a bench
script can be copied to a bare GPU machine together with ``src/`` and run there.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def ensure_src_on_path() -> None:
    """Make ``blob_lora`` importable from the checkout when the package is not installed."""
    try:
        import blob_lora  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a reader needs to compare numbers across machines."""
    import peft
    import transformers

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "cpu_model": _cpu_model(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu_model"] or platform.processor() or "cpu"
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of ``fn()`` in seconds, with the device queue drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median (the reported number) plus the spread, so a disturbed run is visible."""
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


# ---------------------------------------------------------------------------------------------
# Peak memory of one call
# ---------------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_cpu_memory_to_os() -> bool:
    """Make glibc hand freed blocks back to the OS, so that RSS tracks live tensors.

    By default glibc keeps freed heap memory (and raises its mmap threshold as large blocks are
    freed), so the RSS before a step already contains the previous step's activations and the
    growth during a step reads as ~0. A fixed 128 KiB mmap threshold makes every large tensor its
    own mapping, released on free; ``malloc_trim`` returns what the heap still holds. Returns
    False where this is not glibc (the numbers are then even rougher).
    """
    libc = _libc()
    if libc is None:
        return False
    try:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    except AttributeError:
        return False
    return True


class _RssSampler(threading.Thread):
    """Polls the process RSS every ``interval`` seconds and keeps the maximum."""

    def __init__(self, interval: float = 0.0005) -> None:
        super().__init__(daemon=True)
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop_event = threading.Event()
        self.peak = self._proc.memory_info().rss

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak


def measure_peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Memory in use before ``fn()`` and the peak during it, in bytes.

    CUDA: exact, from the caching allocator (``memory_allocated`` / ``max_memory_allocated``).
    CPU: approximate, the process RSS sampled by a thread every 0.5 ms (a short spike between
    two samples is missed; RSS also counts non-tensor memory).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"before_bytes": before, "peak_bytes": peak, "kind": "cuda_max_memory_allocated"}
    trimmed = return_freed_cpu_memory_to_os()
    sampler = _RssSampler()
    before = sampler.peak
    sampler.start()
    try:
        fn()
    finally:
        peak = sampler.stop()
    kind = "cpu_rss_sampled" + ("" if trimmed else "_untrimmed")
    return {"before_bytes": before, "peak_bytes": peak, "kind": kind}


def release_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (pastes straight into bench/README.md)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# The paper's base model (LLaMA-2-7B) as a config shape, for randomly initialised GPU runs.
LLAMA2_7B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def random_llama(shape: dict[str, int], device: torch.device, dtype: torch.dtype, **config: Any):
    """A randomly initialised ``LlamaForCausalLM`` of ``shape`` (e.g. ``LLAMA2_7B_SHAPE``),
    untied, without a KV cache, built directly on ``device`` in ``dtype``: a 7B model's 13 GB
    never pass through a float32 CPU copy, and its random init runs where it lives. ``config``:
    further ``LlamaConfig`` fields. The caller seeds the init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(**shape, tie_word_embeddings=False, use_cache=False, **config)
    with torch.device(device):
        return LlamaForCausalLM._from_config(llama, dtype=dtype)


def positive_int(text: str) -> int:
    """An argparse type for counts and sizes: a 0 or a negative number would be taken for
    "the setting's default" by ``x or default`` or run a meaningless measurement (a slice
    ``[:-3]``, an empty batch), so it is refused with the option's name."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def natural_int(text: str) -> int:
    """An argparse type for counts that may be 0 (warm-up rounds)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_table_options(p: argparse.ArgumentParser) -> None:
    """The options of a bench on the regime table's setting: token budget, seed, data, report."""
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="token budget (default 256, the table's; tiny: its setting's)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-root", default=None, help="offline datasets (else BLOB_LORA_DATA)")
    p.add_argument("--out", type=Path, default=None)


def resolve_table_options(args: argparse.Namespace, tiny_max_length: int) -> None:
    """Fill the defaults of :func:`add_table_options` (the char tokenizer of ``--setting tiny``
    spends a token per character, hence its longer budget)."""
    if args.data_root is None:
        args.data_root = os.environ.get("BLOB_LORA_DATA") or str(REPO.parent / "shared" / "data")
    if args.max_length is None:
        args.max_length = tiny_max_length if args.setting == "tiny" else 256


def checkout_relative(path: str | Path) -> str:
    """``path`` as it lies inside its git checkout (``paper/out/...``), so a report names no
    folder of the machine it ran on; its last component alone outside any checkout."""
    path = Path(path).resolve()
    for root in path.parents:
        if (root / ".git").exists():
            return str(path.relative_to(root))
    return path.name


def write_report(args: argparse.Namespace, name: str, load_start: list[float],
                 result: dict[str, Any]) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """``bench/out/<name>_<setting>.json``, or ``--out``: the machine, the load average over
    the run, the settings and ``result``. Never ``bench/results/`` by default: a run of record
    is written there on purpose (``--out bench/results/...``), not by trying a script out."""
    out_path = args.out or REPO / "bench" / "out" / f"{name}_{args.setting}.json"
    config = {k: v for k, v in vars(args).items() if k not in ("out", "data_root")}
    load = {"start": load_start, "end": list(os.getloadavg())}
    report = {"machine": machine_info(torch.device("cpu")), "load_average": load,
              "config": config, **result}  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from blob_lora.utils.atomic import atomic_write_json

    atomic_write_json(out_path, report)
    return out_path, report
