"""Per-example rows are JSON-serializable and agree with the aggregate functions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blob_lora.metrics import decompose_uncertainty, per_example_records

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.75, 0.0], [0.4, 0.35, 0.25]])
LABELS = torch.tensor([0, 1, 2])


def test_basic_rows() -> None:
    rows = per_example_records(PROBS, LABELS)
    assert json.loads(json.dumps(rows)) == rows
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert [r["pred"] for r in rows] == [0, 1, 0]
    assert [r["correct"] for r in rows] == [True, True, False]
    assert [r["label"] for r in rows] == [0, 1, 2]
    assert rows[1]["probs"] == pytest.approx([0.25, 0.75, 0.0])
    assert rows[1]["probs"][2] == 0.0
    assert rows[0]["confidence"] == pytest.approx(0.7)
    assert set(rows[0]) == {"id", "label", "probs", "pred", "confidence", "correct"}
    assert all(type(r["correct"]) is bool and type(r["pred"]) is int for r in rows)


def test_ids_are_plain_python() -> None:
    for ids, expected in [
        (["q1", "q2", "q3"], ["q1", "q2", "q3"]),
        (torch.tensor([10, 11, 12]), [10, 11, 12]),
        (np.array([5, 6, 7]), [5, 6, 7]),
    ]:
        rows = per_example_records(PROBS, LABELS, ids=ids)
        assert [r["id"] for r in rows] == expected
        assert all(type(r["id"]) in (str, int) for r in rows)
        json.dumps(rows)


def test_uncertainty_columns_match_decomposition() -> None:
    g = torch.Generator().manual_seed(0)
    sp = torch.softmax(torch.randn(5, 3, 3, generator=g, dtype=torch.float64), dim=-1)
    rows = per_example_records(sp.mean(0), LABELS, ids=["a", "b", "c"], sample_probs=sp)
    d = decompose_uncertainty(sp)
    for i, r in enumerate(rows):
        for key in ("total", "aleatoric", "epistemic"):
            assert r[key] == pytest.approx(d[key][i].item(), rel=1e-12)
    assert json.loads(json.dumps(rows)) == rows


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ids": ["a"]}, "ids: has 1 entries"),
        ({"sample_probs": torch.full((2, 3, 2), 0.5)}, "does not match"),
        ({"sample_probs": torch.full((3, 3), 1 / 3)}, "expected shape"),
    ],
)
def test_invalid_inputs(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        per_example_records(PROBS, LABELS, **kwargs)
