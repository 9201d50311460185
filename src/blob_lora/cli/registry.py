"""The sub-command table: ``commands/*`` register into it, ``main`` builds the parser from it.

Why its own module: the commands and the parser both need the table, and neither may import
the other both ways (``main`` imports the command modules to register them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}
#: the commands that run on several processes (``accelerate launch``); the others refuse it
MULTI_PROCESS: set[str] = set()


def command(name: str, help_text: str, *, multi_process: bool = False):
    """Register a sub-command: ``configure(parser)`` adds options, ``run(args)`` executes.
    ``multi_process``: it may be started by ``accelerate launch`` on several processes."""

    def wrap(configure):
        def register(run):
            COMMANDS[name] = (help_text, configure, run)
            if multi_process:
                MULTI_PROCESS.add(name)
            return run

        return register

    return wrap
