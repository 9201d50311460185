"""The sub-command table: ``commands/*`` register into it, ``main`` builds the parser from it.

Why its own module: the commands and the parser both need the table, and neither may import
the other both ways (``main`` imports the command modules to register them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help_text: str):
    """Register a sub-command: ``configure(parser)`` adds options, ``run(args)`` executes."""

    def wrap(configure):
        def register(run):
            COMMANDS[name] = (help_text, configure, run)
            return run

        return register

    return wrap
