"""`default_threads`: every core by default, the user's OMP_NUM_THREADS when set."""

from __future__ import annotations

import os

import torch

from blob_lora.models.loading import default_threads


def test_default_threads_respects_omp_num_threads(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        default_threads()
        assert torch.get_num_threads() == 1  # the user's choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        default_threads()
        assert torch.get_num_threads() == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)
