"""Lines the commands print about a finished run, shared by ``train`` and ``demo`` (a module of
its own: ``demo`` is registered by the commands package, so it cannot import from it)."""

from __future__ import annotations


def std_of_a_line(std: dict) -> str:
    """One line on where a BLoB run's std of A ended (``summary.json``'s ``std_of_A``): a
    narrow range far from the prior means the KL set it, and the samples then say little more
    than the mean weights."""
    priors = "/".join(
        f"{p:g}" for p in sorted({row["prior_std"] for row in std["layers"].values()})
    )
    n = len(std["layers"])
    return (
        f"std of A: {std['q01']:.4g}-{std['q99']:.4g} over every element of "
        f"{n} layer{'' if n == 1 else 's'} (q01-q99; prior {priors}; per layer in summary.json)"
    )
