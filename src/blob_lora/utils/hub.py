"""Whether the Hugging Face Hub can be reached from here, asked once per process.

Why: on a machine without network, ``datasets`` and ``transformers`` retry every request they
make to the Hub (waits of 1, 2, 4, 8 and 8 s: about 25 s per file, twice for a model), and a
``compare`` of many runs paid that for every run before saying what it could have said at
once. A Hub name is therefore checked first: where a short connection to the Hub's host fails
and the file is not in the local Hugging Face cache either (which the libraries would fall back
to), the caller refuses it in one line that says what to do.

Not judged here: a process told to work offline (``HF_HUB_OFFLINE`` and the like: the libraries
then read their caches without retrying), and a configured proxy (the host may be reachable
through it and not directly).
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

#: how long the connection to the Hub's host may take before it counts as unreachable
PROBE_SECONDS = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_TRUE = ("1", "ON", "YES", "TRUE")


def _told_offline() -> bool:
    return any(os.environ.get(k, "").strip().upper() in _TRUE for k in _OFFLINE_VARS)


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hub's host (``HF_ENDPOINT``, else huggingface.co) cannot be reached, or ``None``
    where it can or where it is not ours to judge (module doc). Asked once per process."""
    if _told_offline() or any(os.environ.get(k) for k in _PROXY_VARS):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return f"{host}:{port}: {exc}"
    return None


def _in_cache(repo_id: str, filename: str, repo_type: str) -> bool:
    """Whether the libraries hold ``repo_id`` locally: ``filename`` in the Hub's file cache,
    or, for a dataset, a copy ``datasets`` prepared in its own cache (``HF_DATASETS_CACHE``:
    ``<namespace>___<name>/``), which ``load_dataset`` falls back to without the Hub, even
    where the file cache no longer has the files."""
    from huggingface_hub import try_to_load_from_cache

    if repo_type == "dataset":
        import datasets

        if (Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).is_dir():
            return True
    try:
        found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    except Exception:  # noqa: BLE001 - a name the cache cannot hold is simply not in it
        return False
    return isinstance(found, str)


def unreachable_for(repo_id: str, filename: str, repo_type: str = "model") -> str | None:
    """Why ``repo_id`` cannot come from the Hub now: its host unreachable and its ``filename``
    (what the library asks for first) not in the local Hugging Face cache; ``None`` otherwise."""
    reason = hub_unreachable()
    if reason is None or _in_cache(repo_id, filename, repo_type):
        return None
    return reason
