"""A tiny local model folder and a bring-your-own task, for runs of the real ``blob-lora`` CLI.

The model is a 2-block Llama (hidden 32) saved with ``save_pretrained`` (safetensors) next to
SmolLM2's tokenizer, so ``--model <folder>`` goes through the same loading path as a user's
model. Building it reads the embedded GGUF tokenizer (~20 s), so the folder is kept in
pytest's cache directory between sessions (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.factories import save_model_folder, tiny_llama

ASSET_VERSION = "tiny-run-v1"
N_TRAIN = 16
N_EVAL = 7  # deliberately not a multiple of world size x eval batch


@dataclass(frozen=True)
class Assets:
    model: Path  # --model folder
    task: Path  # --task folder (train.jsonl, validation.jsonl)
    other_model: Path  # same tokenizer, another hidden size: adapters must not fit it


def _records(n: int, start: int, rng: random.Random) -> str:
    lines = []
    for i in range(start, start + n):
        k = rng.choice([2, 3, 4])
        rec = {
            "id": f"q{i}",
            "question": f"Which item goes with number {rng.randint(0, 99)} in row {i}?",
            "choices": [f"option {j} {rng.randint(0, 9)}" for j in range(k)],
            "answer": rng.randrange(k),
        }
        lines.append(json.dumps(rec) + "\n")
    return "".join(lines)


def _save_model(folder: Path, tokenizer, hidden: int) -> None:
    model = tiny_llama(
        0,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    save_model_folder(folder, model, tokenizer)


def _build(root: Path) -> None:
    from blob_lora.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    _save_model(root / "model", tokenizer, hidden=32)
    _save_model(root / "other-model", tokenizer, hidden=48)
    task = root / "task"
    task.mkdir()
    rng = random.Random(0)
    (task / "train.jsonl").write_text(_records(N_TRAIN, 0, rng))
    (task / "validation.jsonl").write_text(_records(N_EVAL, 100, rng))


def tiny_assets(cache_root: Path) -> Assets:
    """Build the assets under ``cache_root`` once (atomically), then reuse them."""
    final = cache_root / ASSET_VERSION
    if not (final / "DONE").is_file():
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{ASSET_VERSION}.", dir=cache_root))
        try:
            _build(tmp)
            (tmp / "DONE").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError:
            if not (final / "DONE").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Assets(final / "model", final / "task", final / "other-model")


def base_args(assets: Assets, out: Path, *extra: str) -> list[str]:
    """``train`` arguments of a fast, CPU-sized run into ``out``."""
    return [
        "train",
        "--model",
        str(assets.model),
        "--task",
        str(assets.task),
        "--out",
        str(out),
        "--max-length",
        "64",
        "--target-modules",
        "q_proj,v_proj",
        "--lr",
        "0.01",
        "--no-progress",
        *extra,
    ]


def cli_env() -> dict[str, str]:
    """Environment of CLI subprocesses: one thread each (2 shared cores), repo on the path."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def cli_command() -> list[str]:
    return [sys.executable, "-m", "blob_lora.cli.main"]


def run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command() + args,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def latest_step(run: Path) -> int:
    """The step ``run/checkpoints/latest`` points at (0: none yet)."""
    try:
        return int((run / "checkpoints" / "latest").read_text().strip()[5:])
    except (OSError, ValueError):
        return 0


def signal_after_checkpoint(
    args: list[str], run: Path, step: int, sig: int, timeout: float = 240
) -> tuple[int, str]:
    """Run the CLI with ``args`` in a subprocess, send ``sig`` once ``run`` holds a checkpoint
    of ``step`` or later, and return its exit code and stderr (a kill may land in the middle
    of the next checkpoint write)."""
    return signal_when(args, lambda: latest_step(run) >= step, sig, timeout)


def signal_when(
    args: list[str], ready: Callable[[], bool], sig: int, timeout: float = 240
) -> tuple[int, str]:
    """Run the CLI with ``args`` in a subprocess, send ``sig`` once ``ready()`` holds (or the
    process ended), and return its exit code and stderr."""
    proc = subprocess.Popen(
        cli_command() + args,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline, "the CLI subprocess made no progress"
            time.sleep(0.002)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def train_log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class one_thread:
    """Run in-process training single-threaded, like the CLI subprocesses (bitwise equality)."""

    def __enter__(self) -> one_thread:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)


@pytest.fixture(scope="session")
def assets(request, tmp_path_factory) -> Assets:
    """The tiny model and task; kept in pytest's cache folder when the cache plugin is on."""
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("blob-lora-assets") if cache is not None else tmp_path_factory.mktemp("a")
    return tiny_assets(root)


def error_line(stderr: str) -> str:
    """The one ``blob-lora <command>: error: ...`` line (progress bars may share stderr)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("blob-lora ")]
    assert len(lines) == 1, lines
    return lines[0]
