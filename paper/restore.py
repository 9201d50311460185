"""Put a published table's finished runs back into its experiment folder.

``paper/out/`` is git-ignored, so a new machine starts a long table (``blob-lora compare``,
resumable) with none of the runs an earlier sitting finished, and would train them all again.
``paper/publish.py`` keeps every finished run's record in git (settings, training log,
summary, metrics, gzipped predictions; no weights); this script copies those runs back into
the experiment's ``out`` folder, predictions unzipped, so ``compare`` counts them finished and
its reliability diagrams pool them again. Their adapters are not restored: a method that
builds on one (an ensemble's member 0, Laplace's MAP run) trains it once more, and the next
copies that (``comparison.compare.shareable_runs``). A run folder already present is left
alone: it is the newer one (publishing copies from it). Each run is written whole or not at all.

    .venv/bin/python paper/restore.py paper/regime_tables.yaml results/regime_tables
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from collections.abc import Sequence
from pathlib import Path

from blob_lora.comparison import load_spec
from blob_lora.training.run_dir import SUMMARY
from blob_lora.utils.atomic import atomic_directory


def published_runs(published: Path) -> list[Path]:
    """The run folders of a published table, relative to it (``runs/<task>/<method>/seed<s>``)."""
    return sorted(p.parent.relative_to(published) for p in published.glob(f"runs/*/*/*/{SUMMARY}"))


def restore_run(source: Path, target: Path) -> None:
    """Copy one published run into ``target`` (which must not exist), unzipping predictions."""
    with atomic_directory(target) as tmp:
        for path in sorted(source.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(source)
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.name.endswith(".jsonl.gz"):
                dest.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
            else:
                shutil.copy2(path, dest)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, help="the experiment file (its `out` is restored into)")
    p.add_argument("published", type=Path, help="the published table (results/<name>)")
    args = p.parse_args(argv)
    spec = load_spec(args.config)
    runs = published_runs(args.published)
    if not runs:
        raise SystemExit(f"{args.published}: no published runs (runs/*/*/*/{SUMMARY}) found")
    restored, kept = 0, 0
    for rel in runs:
        target = spec.out / rel
        if target.exists():
            kept += 1
            continue
        restore_run(args.published / rel, target)
        restored += 1
    print(
        f"restored {restored} runs of {spec.name} into {spec.out}; "
        f"{kept} already there were left alone"
    )


if __name__ == "__main__":
    main()
