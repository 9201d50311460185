"""Whether the Hugging Face Hub can be reached: a short connection to its host (``HF_ENDPOINT``),
asked once per process, not judged where the process is told to work offline or through a
proxy; a file in the local Hugging Face cache counts as available."""

from __future__ import annotations

import socket
import time

import pytest

from blob_lora.models.loading import load_tokenizer
from blob_lora.utils import hub
from blob_lora.utils.errors import BlobLoraError


@pytest.fixture
def endpoint(monkeypatch):
    """Point the Hub at a local port; no offline or proxy settings; a fresh probe."""
    for name in (*hub._OFFLINE_VARS, *hub._PROXY_VARS):
        monkeypatch.delenv(name, raising=False)
    hub.hub_unreachable.cache_clear()
    yield lambda url: monkeypatch.setenv("HF_ENDPOINT", url)
    hub.hub_unreachable.cache_clear()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens


def test_a_host_that_refuses_is_unreachable_and_the_answer_is_kept(endpoint) -> None:
    endpoint(f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    reason = hub.hub_unreachable()
    assert reason is not None and reason.startswith("127.0.0.1:")
    assert time.perf_counter() - start < hub.PROBE_SECONDS + 1
    assert hub.hub_unreachable() is reason  # once per process


def test_a_listening_host_is_reachable(endpoint) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        endpoint(f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_unreachable() is None


@pytest.mark.parametrize(("name", "value"), [("HF_HUB_OFFLINE", "1"), ("HTTPS_PROXY", "http://p")])
def test_offline_or_proxied_processes_are_not_judged(endpoint, monkeypatch, name, value) -> None:
    endpoint(f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv(name, value)
    assert hub.hub_unreachable() is None


def test_a_cached_file_is_available_without_the_hub(endpoint, monkeypatch) -> None:
    endpoint(f"http://127.0.0.1:{_closed_port()}")
    cached = {("org/cached", "config.json", "model"): "/cache/org/cached/config.json"}
    monkeypatch.setattr(
        "huggingface_hub.try_to_load_from_cache",
        lambda repo_id, filename, repo_type=None: cached.get((repo_id, filename, repo_type)),
    )
    assert hub.unreachable_for("org/cached", "config.json") is None
    assert hub.unreachable_for("org/other", "config.json") is not None


def test_a_hub_model_name_offline_is_refused_at_once(monkeypatch) -> None:
    """Without the Hub, a name that is no folder and no embedded model is refused in one line
    before transformers' retries (about a minute for a model's two files)."""
    monkeypatch.setattr(
        "blob_lora.models.loading.unreachable_for", lambda *a, **k: "huggingface.co:443: down"
    )
    with pytest.raises(BlobLoraError) as info:
        load_tokenizer("someorg/some-model")
    message = str(info.value)
    assert message.startswith("--model someorg/some-model: no such folder, no embedded model")
    assert "Hub is unreachable (huggingface.co:443: down)" in message and "\n" not in message
