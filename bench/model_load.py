"""Loading the embedded model: its GGUF file directly, against the converted folder.

``blob-lora`` loads ``smollm2-135m`` from a float32 transformers folder it converts once from
the GGUF file (``blob_lora.models.loading``). Every ``train``, ``evaluate``, ``predict``, each
run of ``compare`` and many tests load the model; this measures what one load costs each way,
in this process, alternating (GGUF, folder, GGUF, folder, ...): ``load_model_and_tokenizer``
as the library calls it, against the model and tokenizer read from the GGUF file as before.

    OMP_NUM_THREADS=2 .venv/bin/python bench/model_load.py

Writes ``bench/out/model_load_cpu.json`` (``--out bench/results/model_load_cpu.json`` for a
run of record) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_src_on_path, format_table, machine_info, positive_int, summary  # noqa: E402

ensure_src_on_path()

from blob_lora.models import loading  # noqa: E402
from blob_lora.utils.atomic import atomic_write_json  # noqa: E402


def load_gguf(name: str) -> None:
    from transformers import AutoModelForCausalLM

    gguf = loading._embedded_gguf(name)
    AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    loading._tokenizer_from(str(gguf.parent), gguf_file=gguf.name)


@contextmanager
def _cache_at(folder: str) -> Iterator[None]:
    """``$BLOB_LORA_CACHE`` = ``folder`` for the block (a fresh conversion, never into the
    user's cache), then as it was: the folder is deleted after, a caller must not keep it."""
    previous = os.environ.get("BLOB_LORA_CACHE")
    os.environ["BLOB_LORA_CACHE"] = folder
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("BLOB_LORA_CACHE", None)
        else:
            os.environ["BLOB_LORA_CACHE"] = previous


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=positive_int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out/model_load_cpu.json")
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"gguf": [], "folder": [], "convert (first use)": []}
    with tempfile.TemporaryDirectory() as cache, _cache_at(cache):
        start = time.perf_counter()
        loading.load_model_and_tokenizer(args.model)  # converts
        times["convert (first use)"].append(time.perf_counter() - start)
        for _ in range(args.repeats):
            for kind, load in (("gguf", load_gguf), ("folder", loading.load_model_and_tokenizer)):
                gc.collect()
                start = time.perf_counter()
                load(args.model)
                times[kind].append(time.perf_counter() - start)
    stats = {k: summary(v) for k, v in times.items()}
    rows = [[k, s["median"], s["min"], s["max"], s["n"]] for k, s in stats.items()]
    ratio = stats["folder"]["median"] / stats["gguf"]["median"]
    print(format_table(["load", "median s", "min s", "max s", "n"], rows))
    print(f"folder / gguf: {ratio:.3f}")
    payload = {
        "machine": machine_info(torch.device("cpu")),
        "model": args.model,
        "seconds": stats,
        "times_s": times,
        "folder_over_gguf": ratio,
    }
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
