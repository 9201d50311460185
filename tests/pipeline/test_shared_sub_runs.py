"""A composite run takes a finished run that trained exactly as one of its sub-runs would
(``pipeline.composite.share_finished_run``): an ensemble under ``--ensemble-share-seed`` takes
the LoRA run of its seed as member 0, Laplace-LoRA takes it as its MAP run where the MAP's
weight decay rounds away. The copy is what training the sub-run again gives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from blob_lora.cli.main import main
from blob_lora.methods.ensemble import member_seed
from blob_lora.methods.lora import decay_is_inert
from blob_lora.pipeline.composite import training_differences
from tests.factories import (
    tiny_compare_experiment,
    tiny_model_folder,
    tiny_run_config,
    train_tiny,
)

torch.set_num_threads(1)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    (weights,) = list((run / "adapter").glob("*.safetensors"))
    return load_file(str(weights))


def _compare_tiny(tmp_path: Path, data_root: Path, methods: list[str], **train: object) -> Path:
    """``blob-lora compare`` of ``methods`` (ensembles of 2 sharing the seed's LoRA run) on the
    tiny experiment; returns the WinoGrande-S runs folder."""
    exp = tiny_compare_experiment(
        tiny_model_folder(tmp_path / "model"),
        methods,
        method_options={"ensemble": {"ensemble_size": 2, "ensemble_share_seed": True}},
    )
    exp["train"].update(train)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(exp))
    out = tmp_path / "out"
    args = ["compare", "--config", str(config), "--out", str(out), "--no-progress"]
    assert main([*args, "--data-root", str(data_root)]) == 0
    return out / "runs" / "winogrande_s"


def test_member_seeds_with_and_without_sharing() -> None:
    assert [member_seed(7, k) for k in range(3)] == [7000, 7001, 7002]
    assert [member_seed(7, k, share_seed=True) for k in range(3)] == [7, 7001, 7002]


def test_only_settings_that_change_learning_count(tmp_path, data_root) -> None:
    lora = tiny_run_config(tmp_path / "a", data_root, "lora", seed=7).to_dict()
    member = tiny_run_config(
        tmp_path / "b", tmp_path, "lora", seed=7, evaluate=False, eval_tasks=[],
        eval_split="validation[:2]", eval_samples=0, ensemble_share_seed=True, ensemble_size=5,
        cache_dir=str(tmp_path / "cache"), log_every=7, checkpoint_every=2,
    ).to_dict()  # fmt: skip
    assert training_differences(lora, member) == []
    other = tiny_run_config(tmp_path / "c", data_root, "lora", seed=7, lr=0.02).to_dict()
    assert training_differences(lora, other) == ["lr"]
    assert training_differences(lora, {**member, "seed": 8}) == ["seed"]


def test_an_ensemble_takes_the_lora_run_of_its_seed_as_member_0(
    tmp_path, data_root, char_base, char_tok
) -> None:
    lora_dir, other_dir = tmp_path / "lora", tmp_path / "lora_lr"
    train_tiny(tiny_run_config(lora_dir, data_root, "lora", seed=7), char_base, char_tok)
    # the same seed at another learning rate trained differently: never taken
    train_tiny(tiny_run_config(other_dir, data_root, "lora", seed=7, lr=0.02), char_base, char_tok)

    shared_dir, own_dir = tmp_path / "shared", tmp_path / "own"
    shared = train_tiny(
        tiny_run_config(shared_dir, data_root, "ensemble", seed=7, ensemble_share_seed=True),
        char_base, char_tok, finished_runs=[other_dir, lora_dir],
    )  # fmt: skip
    own = train_tiny(
        tiny_run_config(own_dir, data_root, "ensemble", seed=7, ensemble_share_seed=True),
        char_base, char_tok,
    )  # fmt: skip

    member0 = shared_dir / "members" / "0"
    assert shared["members"][0]["shared_from"] == os.path.relpath(lora_dir, member0)
    assert json.loads((member0 / "summary.json").read_text())["shared_from"]
    assert "shared_from" not in shared["members"][1] and "shared_from" not in own["members"][0]
    assert [m["seed"] for m in shared["members"]] == [7, 7001]
    # the method's cost still counts the shared member's training
    lora_seconds = json.loads((lora_dir / "summary.json").read_text())["train_seconds"]
    assert shared["members"][0]["train_seconds"] == lora_seconds
    # member 0 trained again is the LoRA run: the same weights, so the same ensemble
    trained_again, taken = _adapter(own_dir / "members" / "0"), _adapter(member0)
    assert trained_again.keys() == taken.keys()
    for name in taken:
        torch.testing.assert_close(taken[name], trained_again[name], rtol=0, atol=1e-6)
    lora = _adapter(lora_dir)
    assert all(torch.equal(taken[name], lora[name]) for name in taken)  # a copy
    (task,) = shared["evaluations"]
    for metric in ("accuracy", "nll", "ece", "brier"):
        assert abs(shared["evaluations"][task][metric] - own["evaluations"][task][metric]) < 1e-5


def test_compare_shares_the_lora_run_with_the_ensemble(tmp_path, data_root) -> None:
    runs = _compare_tiny(tmp_path, data_root, ["lora", "ensemble"])
    ensemble = json.loads((runs / "ensemble/seed1/summary.json").read_text())
    member0 = runs / "ensemble/seed1/members/0"
    assert ensemble["members"][0]["shared_from"] == os.path.relpath(runs / "lora/seed1", member0)
    taken, lora = _adapter(member0), _adapter(runs / "lora/seed1")
    assert taken.keys() == lora.keys() and all(torch.equal(taken[n], lora[n]) for n in taken)
    assert [m["seed"] for m in ensemble["members"]] == [1, 1001]


def test_compare_shares_a_composite_runs_sub_run_when_the_lora_run_is_missing(
    tmp_path, data_root
) -> None:
    """No LoRA run in the experiment (or one published without its adapter): the ensemble
    trains member 0 as the LoRA run of its seed, and Laplace's MAP run takes that member
    instead of training the same run again."""
    pytest.importorskip("blob_lora.methods.laplace")
    # lr 1e-3: the MAP run's decay rounds away, so it trains as LoRA
    runs = _compare_tiny(tmp_path, data_root, ["ensemble", "laplace"], lr=1e-3)
    member0, map_dir = runs / "ensemble/seed1/members/0", runs / "laplace/seed1/map"
    ensemble = json.loads((runs / "ensemble/seed1/summary.json").read_text())
    assert "shared_from" not in ensemble["members"][0]  # trained: nothing to take it from
    shared = json.loads((map_dir / "summary.json").read_text())
    assert shared["shared_from"] == os.path.relpath(member0, map_dir)
    taken, member = _adapter(map_dir), _adapter(member0)
    assert taken.keys() == member.keys()
    assert all(torch.equal(taken[n], member[n]) for n in taken)


def test_decay_is_inert_exactly_where_torch_leaves_the_weight_alone() -> None:
    for x in (1e-9, 1e-8, 2.9e-8, 2.0**-25, 3.0e-8, 4e-8, 5.9e-8, 6e-8, 1e-6):
        weight = torch.ones(4)
        weight.mul_(1 - x)  # AdamW's decoupled decay, as torch computes it
        assert decay_is_inert(x, 1.0) == bool((weight == 1).all()), x
    assert decay_is_inert(1e-3, 0.0)


def test_a_map_run_whose_decay_rounds_away_is_the_lora_run(
    tmp_path, data_root, char_base, char_tok
) -> None:
    """The paper's 1e-5 at lr 1e-3: the MAP run trains bit for bit as LoRA, so the two count as
    the same training; at lr 1e-2 the decay acts, and they do not."""
    runs = {}
    for method, lr in (("lora", 1e-3), ("map", 1e-3), ("map", 1e-2), ("lora", 1e-2)):
        out = tmp_path / f"{method}_{lr}"
        cfg = tiny_run_config(out, data_root, method, seed=3, lr=lr)
        train_tiny(cfg, char_base, char_tok)
        runs[method, lr] = (cfg.to_dict(), _adapter(out))
    (lora, lora_w), (map_, map_w) = runs["lora", 1e-3], runs["map", 1e-3]
    assert all(torch.equal(lora_w[n], map_w[n]) for n in lora_w)
    assert training_differences(map_, lora) == training_differences(lora, map_) == []
    (lora2, lora2_w), (map2, map2_w) = runs["lora", 1e-2], runs["map", 1e-2]
    assert not all(torch.equal(lora2_w[n], map2_w[n]) for n in lora2_w)
    assert training_differences(map2, lora2) == ["method"]  # its decay is the default 1e-5


def test_laplace_takes_the_lora_run_as_its_map_run(tmp_path, data_root, char_base, char_tok):
    pytest.importorskip("blob_lora.methods.laplace")
    lora_dir = tmp_path / "lora"
    train_tiny(tiny_run_config(lora_dir, data_root, "lora", seed=3, lr=1e-3), char_base, char_tok)
    summary = train_tiny(
        tiny_run_config(tmp_path / "laplace", data_root, "laplace", seed=3, lr=1e-3),
        char_base, char_tok, finished_runs=[lora_dir],
    )  # fmt: skip
    map_dir = tmp_path / "laplace" / "map"
    shared = json.loads((map_dir / "summary.json").read_text())
    assert shared["shared_from"] == os.path.relpath(lora_dir, map_dir)
    taken, lora = _adapter(map_dir), _adapter(lora_dir)
    assert all(torch.equal(taken[n], lora[n]) for n in lora)
    assert summary["laplace"]["n_data"] == 8


def _train_cli(model: Path, data_root: Path, out: Path, method: str, *extra: str) -> int:
    argv = ["train", "--model", str(model), "--task", "winogrande_s", "--method", method]
    argv += ["--train-split", "train_s[:8]", "--eval-split", "validation[:2]", "--max-steps", "2"]
    argv += ["--batch-size", "4", "--lr", "0.001", "--target-modules", "q_proj,v_proj"]
    argv += ["--data-root", str(data_root), "--out", str(out), "--no-progress", "--seed", "3"]
    return main([*argv, *extra])


def test_train_reuse_copies_a_finished_run_as_a_sub_run(tmp_path, data_root, capsys) -> None:
    """``blob-lora train --reuse RUN``: the user's own LoRA run becomes the ensemble's member 0
    and Laplace's MAP run, and the command says so; where nothing matches, it says that."""
    model = tiny_model_folder(tmp_path / "model")
    lora = tmp_path / "lora"
    assert _train_cli(model, data_root, lora, "lora") == 0
    share = ["--ensemble-size", "2", "--ensemble-share-seed", "true"]
    ens = tmp_path / "ens"
    assert _train_cli(model, data_root, ens, "ensemble", *share, "--reuse", str(lora)) == 0
    said = capsys.readouterr().out
    assert f"--reuse: {Path('members') / '0'}: copied from {os.path.normpath(lora)}" in said
    taken, own = _adapter(ens / "members" / "0"), _adapter(lora)
    assert taken.keys() == own.keys() and all(torch.equal(taken[n], own[n]) for n in taken)
    assert "shared_from" not in json.loads((ens / "members/1/summary.json").read_text())

    other = tmp_path / "ens_seed4"  # another seed: member 0 is not the LoRA run
    argv = [*share, "--seed", "4", "--reuse", str(lora)]
    assert _train_cli(model, data_root, other, "ensemble", *argv) == 0
    assert "no run trained exactly as a sub-run would" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("method", "reuse", "needle"),
    [
        ("lora", "lora", "method 'lora' trains no sub-runs to copy"),
        ("ensemble", "missing", "is not a finished run folder"),
    ],
)
def test_train_reuse_refuses_what_it_cannot_use(
    tmp_path, data_root, capsys, method, reuse, needle
) -> None:
    model = tiny_model_folder(tmp_path / "model")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "summary.json").write_text("{}")
    (tmp_path / "lora" / "adapter").mkdir()
    out = tmp_path / "run"
    assert _train_cli(model, data_root, out, method, "--reuse", str(tmp_path / reuse)) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()
