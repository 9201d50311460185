"""Selective prediction and OOD detection through ``evaluate_on_task`` on hand-made scores.

A stub method returns chosen per-example predictives for a real data slice, so AURC,
accuracy at coverage, AUROC and AUPR have known values computed by hand.
"""

from __future__ import annotations

import json

import pytest
import torch

from blob_lora.evaluation.evaluate import evaluate_on_task
from blob_lora.methods import Method
from blob_lora.prediction import ood_detection, uncertainty_scores
from blob_lora.tasks import get_task
from tests.factories import tiny_llama


class StubMethod(Method):
    """Hands out ``sample_probs`` (S, N, C) batch by batch, in dataset order."""

    name = "stub"

    def __init__(self, sample_probs: torch.Tensor) -> None:
        self.sample_probs = sample_probs
        self.pos = 0

    def build(self, base, cfg):
        raise NotImplementedError("a stub is never trained")

    def load(self, base, adapter_dir):
        raise NotImplementedError("a stub is never loaded")

    def eval_samples(self, model, requested):
        return self.sample_probs.shape[0]

    def predict_samples(self, model, batch, option_ids, n_samples, fold=None):
        b = batch["input_ids"].shape[0]
        out = self.sample_probs[:, self.pos : self.pos + b]
        self.pos += b
        return out


def two_class(conf: list[float], correct: list[bool], labels: list[int], spread=None):
    """(S=2, N, 2) samples whose mean puts ``conf`` on the label (or on the other class)."""
    spread = spread or [0.0] * len(conf)
    rows = []
    for c, ok, y, d in zip(conf, correct, labels, spread, strict=True):
        top = y if ok else 1 - y
        pair = []
        for s in (c + d, c - d):
            p = [0.0, 0.0]
            p[top], p[1 - top] = s, 1 - s
            pair.append(p)
        rows.append(pair)
    return torch.tensor(rows, dtype=torch.float64).transpose(0, 1)


def labels_of(task, split):
    return [ex.label for ex in task.load(split)]


def run_eval(task, split, probs, out, tokenizer, **kw):
    # split order (by_length=False): the stub hands out its predictives by position
    return evaluate_on_task(
        tiny_llama(), StubMethod(probs), tokenizer, task, out, split=split, batch_size=4,
        max_length=128, by_length=False, **kw,
    )  # fmt: skip


def test_selective_metrics_in_metrics_json(data_root, tokenizer, tmp_path):
    task = get_task("winogrande_s", data_root)
    split = "validation[:10]"
    y = labels_of(task, split)
    conf = [1.0 - 0.05 * i for i in range(10)]  # distinct, decreasing
    correct = [True] * 7 + [False, True, False]
    metrics = run_eval(task, split, two_class(conf, correct, y), tmp_path / "id", tokenizer)
    # risks at k = 1..10: 0 x7, 1/8, 1/9, 2/10
    assert metrics["aurc"] == pytest.approx((1 / 8 + 1 / 9 + 2 / 10) / 10)
    assert metrics["acc_at_80"] == pytest.approx(7 / 8)
    assert metrics["acc_at_90"] == pytest.approx(8 / 9)
    assert metrics["acc_at_95"] == pytest.approx(8 / 10)
    assert metrics["accuracy"] == pytest.approx(0.8)
    saved = json.loads((tmp_path / "id" / "metrics.json").read_text())
    assert saved["aurc"] == metrics["aurc"] and saved["acc_at_95"] == metrics["acc_at_95"]
    assert (tmp_path / "id" / "risk_coverage.png").stat().st_size > 1000
    assert (tmp_path / "id" / "reliability.png").is_file()


def test_ood_detection_against_id_folder(data_root, tokenizer, tmp_path):
    task = get_task("winogrande_s", data_root)
    id_split, ood_split = "validation[:4]", "validation[4:8]"
    id_probs = two_class([0.95, 0.9, 0.85, 0.6], [True] * 4, labels_of(task, id_split))
    ood_probs = two_class(
        [0.7, 0.65, 0.55, 0.5], [True, False, True, True], labels_of(task, ood_split),
        spread=[0.04, 0.02, 0.03, 0.05],
    )  # fmt: skip
    run_eval(task, id_split, id_probs, tmp_path / "id", tokenizer)
    metrics = run_eval(
        task, ood_split, ood_probs, tmp_path / "ood", tokenizer, ood_against=tmp_path / "id"
    )
    report = json.loads((tmp_path / "ood" / "ood.json").read_text())
    assert report["n_id"] == report["n_ood"] == 4
    assert report["id_source"] == str(tmp_path / "id")
    # 1-confidence: ID {.05,.1,.15,.4}, OOD {.3,.35,.45,.5}: 14 of 16 pairs ranked right;
    # ranking .5 .45 (.4 ID) .35 .3 ...: precision at each OOD 1, 1, 3/4, 4/5
    for name in ("1-confidence", "total"):  # two classes: entropy is monotone in confidence
        assert report["scores"][name]["auroc"] == pytest.approx(14 / 16)
        assert report["scores"][name]["aupr"] == pytest.approx((1 + 1 + 0.75 + 0.8) / 4)
    # every ID example has identical samples (MI 0), every OOD one disagrees: perfect
    assert report["scores"]["epistemic"] == pytest.approx({"auroc": 1.0, "aupr": 1.0})
    assert metrics["ood_auroc_confidence"] == pytest.approx(14 / 16)
    assert metrics["ood_auroc_epistemic"] == pytest.approx(1.0)
    assert (tmp_path / "ood" / "ood_roc.png").stat().st_size > 1000
    # the same function on the two folders (what ``compare`` calls) gives the same numbers
    again = ood_detection(tmp_path / "id" / "predictions.jsonl", tmp_path / "ood")
    assert again["scores"] == report["scores"]


def test_uncertainty_scores_without_samples_and_bad_reference(tmp_path, tokenizer, data_root):
    rows = [{"probs": [0.75, 0.25]}, {"probs": [0.5, 0.5], "total": 0.69}]
    s = uncertainty_scores(rows)
    assert "epistemic" not in s
    assert s["1-confidence"].tolist() == [0.25, 0.5]
    assert s["total"][0].item() == pytest.approx(
        -(0.75 * torch.tensor(0.75).log() + 0.25 * torch.tensor(0.25).log()).item()
    )
    report = ood_detection(rows, [{"probs": [0.4, 0.6]}])
    assert (
        set(report["scores"]) == {"total", "1-confidence"} and "epistemic" in report["not_scored"]
    )
    from blob_lora.utils.errors import DataError

    task = get_task("winogrande_s", data_root)
    with pytest.raises(DataError, match="missing not found: expected an evaluation folder"):
        run_eval(task, "validation[:2]", two_class([0.9, 0.8], [True, True], [0, 0]),
                 tmp_path / "x", tokenizer, ood_against=tmp_path / "missing")  # fmt: skip


def test_evaluate_with_fast_modes(data_root, tokenizer, tmp_path):
    from blob_lora.methods import get_method
    from blob_lora.prediction import EarlyStop
    from tests.prediction.conftest import blob_model

    task = get_task("winogrande_s", data_root)
    model, method = blob_model(bayesian_blocks=1), get_method("blob")
    kw = {"split": "validation[:5]", "n_samples": 4, "max_length": 96, "batch_size": 3}
    results = {}
    for mode in ("fold", "prefix", "prefix-early"):
        torch.manual_seed(0)
        results[mode] = evaluate_on_task(
            model, method, tokenizer, task, tmp_path / mode, predictive=mode,
            early=EarlyStop(tol=1.0, min_samples=2), **kw,
        )  # fmt: skip
    for key in ("nll", "ece", "aurc", "mean_epistemic_uncertainty"):
        assert results["prefix"][key] == pytest.approx(results["fold"][key], abs=1e-6)
    assert results["prefix"]["mean_samples_used"] == 4
    assert results["prefix-early"]["mean_samples_used"] == 2  # tol 1: stop after the first group
    rows = [json.loads(x) for x in (tmp_path / "prefix-early" / "predictions.jsonl").open()]
    assert len(rows) == 5 and all(r["epistemic"] >= 0 and "aleatoric" in r for r in rows)


def test_cli_evaluate_ood_reference(run_dir, data_root, tmp_path, capsys):
    from blob_lora.cli.main import main

    base = ["evaluate", "--run", str(run_dir), "--data-root", str(data_root), "--no-progress"]
    id_dir, ood_dir = tmp_path / "id", tmp_path / "ood"
    assert (
        main([*base, "--task", "winogrande_s", "--split", "validation[:4]", "--out", str(id_dir)])
        == 0
    )
    code = main(
        [*base, "--task", "winogrande_s", "--split", "validation[4:8]", "--out", str(ood_dir),
         "--ood-reference", str(id_dir)]
    )  # fmt: skip
    assert code == 0
    report = json.loads((ood_dir / "ood.json").read_text())
    assert report["n_id"] == report["n_ood"] == 4
    assert set(report["scores"]) == {"total", "epistemic", "1-confidence"}
    metrics = json.loads((ood_dir / "metrics.json").read_text())
    assert metrics["ood_auroc_epistemic"] == report["scores"]["epistemic"]["auroc"]
    assert {"aurc", "acc_at_80", "acc_at_90", "acc_at_95"} <= set(metrics)
    assert (ood_dir / "ood_roc.png").is_file() and (id_dir / "risk_coverage.png").is_file()
    bad = main([*base, "--task", "winogrande_s", "--split", "validation[:2]", "--out",
                str(tmp_path / "x"), "--ood-reference", str(tmp_path / "nothing")])  # fmt: skip
    assert bad == 2 and "expected an evaluation folder" in capsys.readouterr().err


class PaddingSpy(Method):
    """A deterministic method (the tiny model's own option scores, one "sample") that records
    the padded shape of every batch it is given."""

    name = "spy"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def build(self, base, cfg):
        raise NotImplementedError

    def load(self, base, adapter_dir):
        raise NotImplementedError

    def eval_samples(self, model, requested):
        return 1

    def predict_samples(self, model, batch, option_ids, n_samples, fold=None):
        from blob_lora.models.forward import answer_logits

        self.shapes.append(tuple(batch["input_ids"].shape))
        return answer_logits(model, batch, option_ids).double().softmax(-1).unsqueeze(0)


def test_evaluation_batches_by_length_same_results_less_padding(data_root, tokenizer, tmp_path):
    """Scoring a split in batches of similar length (the default) pads less and changes
    nothing a deterministic method reports: per-question probabilities, in split order."""
    from blob_lora.tasks import length_sorted_batches, task_inputs

    task = get_task("arc_easy", data_root)
    split, bs, max_length = "validation[:24]", 5, 512
    model = tiny_llama(0, max_position_embeddings=max_length).eval()
    rows, spies = {}, {}
    for by_length in (False, True):
        spies[by_length] = spy = PaddingSpy()
        out = tmp_path / str(by_length)
        evaluate_on_task(
            model, spy, tokenizer, task, out, split=split, batch_size=bs,
            max_length=max_length, by_length=by_length,
        )  # fmt: skip
        rows[by_length] = [json.loads(x) for x in (out / "predictions.jsonl").open()]
    assert [r["id"] for r in rows[True]] == [r["id"] for r in rows[False]]
    for a, b in zip(rows[True], rows[False], strict=True):
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)
    lengths = task_inputs(task, split, tokenizer, max_length).dataset.lengths
    padded = {k: sum(b * t for b, t in s.shapes) for k, s in spies.items()}
    sequential = sum(max(lengths[i : i + bs]) * len(lengths[i : i + bs]) for i in range(0, 24, bs))
    by_len = sum(max(lengths[i] for i in b) * len(b) for b in length_sorted_batches(lengths, bs))
    assert padded == {False: sequential, True: by_len}
    assert by_len < sequential  # ARC questions differ in length: sorting saves real work
    assert [t for _, t in spies[True].shapes] == sorted(
        (t for _, t in spies[True].shapes), reverse=True
    )  # longest first
