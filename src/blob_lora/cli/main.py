"""``blob-lora``: train, evaluate and demo (plus predict and compare where installed).

Errors caused by input (bad options, missing files, corrupt checkpoints) are printed as one
clear line with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from collections.abc import Sequence

from blob_lora.cli import commands
from blob_lora.cli.registry import COMMANDS, MULTI_PROCESS
from blob_lora.utils.errors import BlobLoraError

#: Warnings of the dependencies' own versions that a command's user can do nothing about: PEFT
#: 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` whenever it wraps a
#: model, so every training run printed a FutureWarning about code that is not the user's.
DEPENDENCY_NOISE = (r"`is_gradient_checkpointing` is deprecated",)


def build_parser() -> argparse.ArgumentParser:
    """Import every module of ``commands`` (each registers itself), then one sub-parser each."""
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        importlib.import_module(f"{commands.__name__}.{info.name}")

    parser = argparse.ArgumentParser(
        prog="blob-lora",
        description="Fine-tune LLMs with BLoB (Bayesian LoRA) and measure how far to trust them.",
    )
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, run) in COMMANDS.items():
        sub = subs.add_parser(
            name,
            help=help_text,
            description=help_text,
        )
        configure(sub)
        sub.set_defaults(_run=run)
    return parser


def refuse_several_processes(name: str) -> None:
    """Only ``train`` divides its work between processes: every process of another command
    started by ``accelerate launch`` would do all of it and write the same files at once."""
    from blob_lora.training.distributed import launched_processes  # torch: only when run

    world = launched_processes()
    if world > 1 and name not in MULTI_PROCESS:
        raise BlobLoraError(
            f"started as one of {world} processes (WORLD_SIZE={world}): only 'train' runs on "
            f"several; run 'blob-lora {name}' as one process, without accelerate launch"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        for message in DEPENDENCY_NOISE:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        try:
            refuse_several_processes(args.command)
            result = args._run(args)
        except BlobLoraError as exc:
            print(f"blob-lora {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"blob-lora {args.command}: interrupted", file=sys.stderr)
            return 130
    return int(result or 0)


if __name__ == "__main__":
    # ``python -m blob_lora.cli.main`` (e.g. ``accelerate launch -m``): commands register
    # with the importable module, not with this ``__main__`` copy of it.
    from blob_lora.cli.main import main as _main

    sys.exit(_main())
