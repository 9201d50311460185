"""Split names with an optional ``[a:b]`` slice, e.g. ``validation[:2270]``.

A slice is applied *after* shuffling the split with a fixed seed (``SPLIT_SEED = 0``), so
``validation[:2270]`` and ``validation[2270:]`` are a disjoint, random, reproducible
partition of the validation split. This is how BoolQ is trained offline (its train split is
not in the local data copy), and it works for every task. Without brackets the split is
returned whole, in file order.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from blob_lora.utils.errors import ConfigError

SPLIT_SEED = 0

_SPLIT_RE = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[(-?\d*):(-?\d*)\])?$")

T = TypeVar("T")


@dataclass(frozen=True)
class SplitSpec:
    """A parsed split string: the split ``name`` and an optional seeded slice."""

    name: str
    start: int | None = None
    stop: int | None = None
    sliced: bool = False

    def __str__(self) -> str:
        if not self.sliced:
            return self.name
        a = "" if self.start is None else str(self.start)
        b = "" if self.stop is None else str(self.stop)
        return f"{self.name}[{a}:{b}]"


def parse_split(spec: str) -> SplitSpec:
    """Parse ``"name"`` or ``"name[a:b]"`` (Python slice bounds, either may be empty)."""
    if not isinstance(spec, str):
        raise ConfigError(f"split must be a string, got {type(spec).__name__}")
    m = _SPLIT_RE.match(spec.replace(" ", ""))
    if m is None:
        raise ConfigError(
            f"bad split {spec!r}: expected a split name, optionally followed by a slice "
            "such as 'validation[:2270]' or 'validation[2270:]'"
        )
    name, a, b = m.group(1), m.group(2), m.group(3)
    if a is None:
        return SplitSpec(name)
    return SplitSpec(name, int(a) if a else None, int(b) if b else None, True)


def seeded_order(n: int, seed: int = SPLIT_SEED) -> list[int]:
    """The permutation of ``range(n)`` that slices are taken from (stable across runs)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def apply_split_slice(records: Sequence[T], spec: SplitSpec) -> list[T]:
    """Return the records ``spec`` selects: all in file order, or a slice of the shuffle."""
    if not spec.sliced:
        return list(records)
    order = seeded_order(len(records))
    return [records[i] for i in order[spec.start : spec.stop]]
