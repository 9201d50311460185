"""The compact summary table quoted in results/README.md: means over finished seeds, OOD rows
kept apart from the same task's in-distribution row, reference columns matched by row key."""

from __future__ import annotations

from typing import Any

from blob_lora.comparison.tables import build_table, table_json
from summary import render_summary, restrict_seeds


def _table(values: dict[str, dict[str, dict[str, list[float]]]], tasks, methods) -> dict:
    return table_json(build_table(values, methods, tasks, n_seeds=2))


def _compare() -> dict[str, Any]:
    methods = ["lora", "blob"]
    id_values = {
        "accuracy": {"obqa": {"lora": [0.30, 0.28], "blob": [0.29]}, "arc": {"lora": [0.25, 0.27]}},
        "ece": {"obqa": {"lora": [0.20, 0.30], "blob": [0.10]}, "arc": {"lora": [0.40, 0.42]}},
        "nll": {"obqa": {"lora": [1.5, 1.7], "blob": [1.2]}, "arc": {"lora": [2.0, 2.2]}},
    }
    ood_values = {
        "accuracy": {"arc": {"lora": [0.5, 0.7], "blob": [0.6, 0.6]}},
        "ece": {"arc": {"lora": [0.1, 0.1], "blob": [0.05, 0.07]}},
        "nll": {"arc": {"lora": [1.0, 1.0], "blob": [0.9, 0.8]}},
    }
    return {
        "spec": {"methods": methods, "seeds": [1, 2], "ood": {"train_task": "obqa"}},
        "id": {"tasks": ["obqa", "arc"], "table": _table(id_values, ["obqa", "arc"], methods)},
        "ood": {"tasks": ["obqa", "arc"], "table": _table(ood_values, ["obqa", "arc"], methods)},
    }


def test_rows_cells_and_reference_columns() -> None:
    reference = {"paper": {"obqa": "81.6 / 15.3 / 1.04", "arc": "67.7 / 30.6 / 3.07"}}
    lines = render_summary(_compare(), reference=reference).splitlines()
    assert lines[0] == "| task | lora | blob | paper |"
    assert lines[2:] == [
        # means over both seeds; blob has one of two seeds finished
        "| obqa | 29.0 / 25.0 / 1.600 | 29.0 / 10.0 / 1.200 (1/2) | 81.6 / 15.3 / 1.04 |",
        "| arc | 26.0 / 41.0 / 2.100 | – | 67.7 / 30.6 / 3.07 |",
        # the OOD row of arc carries the OOD numbers and no (in-distribution) reference figure
        "| arc (OOD from obqa) | 60.0 / 10.0 / 1.000 | 60.0 / 6.0 / 0.850 | – |",
    ]


def test_method_subset_in_given_order() -> None:
    lines = render_summary(_compare(), methods=["blob"]).splitlines()
    assert lines[0] == "| task | blob |"
    assert lines[-1] == "| arc (OOD from obqa) | 60.0 / 6.0 / 0.850 |"


def test_command_prints_the_table_the_readmes_quote(tmp_path, capsys) -> None:
    import json

    from summary import main

    path = tmp_path / "compare.json"
    path.write_text(json.dumps(_compare()))
    main([str(path), "--methods", "blob"])
    assert capsys.readouterr().out.splitlines()[-1] == (
        "| arc (OOD from obqa) | 60.0 / 6.0 / 0.850 |"
    )


def _run(task: str, method: str, seed: int, evals: dict[str, tuple[float, float, float]]) -> dict:
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "evaluations": {
            method: {
                t: {"accuracy": a, "ece": e, "nll": n, "brier": 0.5}
                for t, (a, e, n) in evals.items()
            }
        },
    }


def test_seed_restriction_compares_baselines_on_the_same_seeds() -> None:
    # lora finished seeds 1 and 2, blob only seed 1: restricted to seed 1, both are full cells
    # with seed 1's numbers, and OOD rows take the OOD training task's runs only.
    compare = _compare()
    compare["runs"] = [
        _run("obqa", "lora", 1, {"obqa": (0.30, 0.20, 1.5), "arc": (0.5, 0.1, 1.0)}),
        _run("obqa", "lora", 2, {"obqa": (0.28, 0.30, 1.7), "arc": (0.7, 0.1, 1.0)}),
        _run("obqa", "blob", 1, {"obqa": (0.29, 0.10, 1.2), "arc": (0.6, 0.05, 0.9)}),
        _run("arc", "lora", 1, {"arc": (0.25, 0.40, 2.0)}),
        _run("arc", "lora", 2, {"arc": (0.27, 0.42, 2.2)}),
    ]
    lines = render_summary(restrict_seeds(compare, [1])).splitlines()
    assert lines[2:] == [
        "| obqa | 30.0 / 20.0 / 1.500 | 29.0 / 10.0 / 1.200 |",
        "| arc | 25.0 / 40.0 / 2.000 | – |",
        "| arc (OOD from obqa) | 50.0 / 10.0 / 1.000 | 60.0 / 5.0 / 0.900 |",
    ]
    # all seeds: the same means as the tables compare.json was written with
    both = render_summary(restrict_seeds(compare, [1, 2])).splitlines()
    assert both[2] == "| obqa | 29.0 / 25.0 / 1.600 | 29.0 / 10.0 / 1.200 (1/2) |"


def test_versus_column_gives_accuracy_difference_ece_ratio_and_nll_difference() -> None:
    # obqa: blob finished 1 of 2 seeds, lora 2 -> no ratio of means over different seeds;
    # OOD arc: both finished both seeds -> (60-60, 6/10, 0.85-1.0)
    lines = render_summary(_compare(), versus=[("blob", "lora")]).splitlines()
    assert lines[0] == "| task | lora | blob | blob vs lora: ΔACC / ECE ratio / ΔNLL |"
    assert lines[2].endswith("| – |")
    assert lines[3].endswith("| – | – |")
    assert lines[4] == (
        "| arc (OOD from obqa) | 60.0 / 10.0 / 1.000 | 60.0 / 6.0 / 0.850 | +0.0 / 0.60 / -0.150 |"
    )
    # on seed 1 alone both have obqa: (29-30, 10/20, 1.2-1.5), from the same runs
    compare = _compare()
    compare["runs"] = [
        _run("obqa", "lora", 1, {"obqa": (0.30, 0.20, 1.5), "arc": (0.5, 0.1, 1.0)}),
        _run("obqa", "blob", 1, {"obqa": (0.29, 0.10, 1.2), "arc": (0.6, 0.05, 0.9)}),
    ]
    one = render_summary(restrict_seeds(compare, [1]), versus=[("blob", "lora")]).splitlines()
    assert one[2].endswith("| -1.0 / 0.50 / -0.300 |")


def test_command_takes_versus_pairs(tmp_path, capsys) -> None:
    import json

    from summary import main

    path = tmp_path / "compare.json"
    path.write_text(json.dumps(_compare()))
    main([str(path), "--methods", "blob", "--versus", "blob", "lora"])
    assert capsys.readouterr().out.splitlines()[-1] == (
        "| arc (OOD from obqa) | 60.0 / 6.0 / 0.850 | +0.0 / 0.60 / -0.150 |"
    )


def test_one_metric_per_table_rows_are_methods_and_full_cells_are_ranked() -> None:
    """``--metric``: a row per method, a column per task (OOD columns apart), the mean of the
    finished seeds; only cells with every seed in are ranked (bold), lower ECE is better and
    higher accuracy, ties both bold."""
    from summary import render_metric

    ece = render_metric(_compare(), "ece").splitlines()
    assert ece[0] == "| method | obqa | arc | OOD arc |"
    # blob's obqa has 1 of 2 seeds: shown with its count and not ranked against lora's 25.0
    assert ece[2] == "| lora | **25.0** | **41.0** | 10.0 |"
    assert ece[3] == "| blob | 10.0 (1/2) | – | **6.0** |"
    acc = render_metric(_compare(), "accuracy", methods=["blob", "lora"]).splitlines()
    assert acc[2] == "| blob | 29.0 (1/2) | – | **60.0** |"
    assert acc[3] == "| lora | **29.0** | **26.0** | **60.0** |"
    nll = render_metric(_compare(), "nll").splitlines()
    assert nll[3] == "| blob | 1.200 (1/2) | – | **0.850** |"


def test_command_prints_one_metric_and_refuses_extra_columns(tmp_path, capsys) -> None:
    import json

    import pytest

    from summary import main

    path = tmp_path / "compare.json"
    path.write_text(json.dumps(_compare()))
    main([str(path), "--metric", "ece", "--methods", "blob"])
    assert capsys.readouterr().out.splitlines() == [
        "| method | obqa | arc | OOD arc |",
        "|---|---|---|---|",
        "| blob | 10.0 (1/2) | – | **6.0** |",
    ]
    with pytest.raises(SystemExit):
        main([str(path), "--metric", "ece", "--versus", "blob", "lora"])


def _quoted(doc: str, table: str) -> bool:
    """Whether ``table``'s lines stand, one after another, in ``doc`` (indentation aside)."""
    want = [line.strip() for line in table.strip().splitlines()]
    have = [line.strip() for line in doc.splitlines()]
    return any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def test_the_readmes_quote_the_tables_their_commands_make_now() -> None:
    """The READMEs say their tables are made by ``paper/summary.py`` from the published
    ``compare.json``: a publish of new runs without regenerating them leaves numbers that no
    longer match the files beside them, which this catches."""
    import json
    from pathlib import Path

    from summary import read_reference, render_metric

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    results_readme = (repo / "results" / "README.md").read_text(encoding="utf-8")
    reference = read_reference(repo / "paper" / "paper_reference.yaml")

    def compare(name: str) -> dict:
        return json.loads((repo / "results" / name / "compare.json").read_text(encoding="utf-8"))

    paper, regime = compare("paper_tables"), compare("regime_tables")
    assert _quoted(readme, render_summary(paper, ["lora", "blob"], reference))
    assert _quoted(
        results_readme, render_summary(paper, ["lora", "map", "blob", "blob-mean"], reference)
    )
    assert _quoted(
        readme,
        render_summary(regime, ["lora", "blob", "blob-mean"], reference, [("blob", "lora")]),
    )
    methods = [
        "lora", "blob", "blob-mean", "mc-dropout", "ensemble", "laplace", "swag",
        "swag-mean", "bayesian-lora",
    ]  # fmt: skip
    for metric in ("ece", "nll", "accuracy"):
        assert _quoted(readme, render_metric(regime, metric, methods)), metric
