"""`blob-lora demo` end to end on a tiny random model: both methods train, are re-opened from
their run folders, evaluated in and out of distribution with the demo's scoring, and the table
reports what the metrics files hold."""

from __future__ import annotations

import json

import pytest

from blob_lora.cli.demo import DEMO_MARKERS, check_out, steady_seconds_per_step
from blob_lora.cli.main import main
from blob_lora.utils.errors import BlobLoraError
from tests.factories import save_model_folder, tiny_llama, tiny_tokenizer


def test_demo_runs_and_reports_its_metrics(tmp_path, data_root, capsys) -> None:
    length_norm = "char"
    # 24 blocks, so that the demo's targets (q/v of blocks 22-29, the head) leave 22 frozen
    tok = tiny_tokenizer()
    base = tiny_llama(
        0, vocab_size=len(tok), num_hidden_layers=24, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = save_model_folder(tmp_path / "tiny", base, tok)
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(model), "--data-root", str(data_root), "--out", str(out)]
    argv += ["--train-split", "train[:8]", "--eval-size", "4", "--epochs", "2"]
    argv += ["--batch-size", "4", "--eval-samples", "2", "--max-length", "512"]
    argv += ["--length-norm", length_norm, "--kl-rescale", "false", "--no-progress"]
    assert main(argv) == 0
    said = capsys.readouterr().out

    results = json.loads((out / "demo_results.json").read_text())["results"]
    table = (out / "demo_table.md").read_text()
    assert set(results) == {"lora", "blob"}
    for method, r in results.items():
        config = json.loads((out / method / "run_config.json").read_text())
        assert config["scoring"] == "cloze" and config["length_norm"] == length_norm
        assert config["task"] == "arc_easy" and config["train_split"] == "train[:8]"
        assert config["kl_rescale"] is False and config["seed"] == 1
        for task in ("arc_easy", "arc_challenge"):
            saved = json.loads((out / method / "eval" / task / "metrics.json").read_text())
            assert saved["n_examples"] == 4 and saved["split"] == "validation[:4]"
            assert saved["scoring"] == f"cloze ({length_norm})"
            assert r["eval"][task]["ece"] == saved["ece"]
            assert f"{saved['ece']:.3f}" in table and f"{saved['mean_confidence']:.3f}" in table
        assert r["eval"]["arc_easy"]["eval_samples"] == (2 if method == "blob" else 0)
    assert "| blob (N=2) |" in table and "| lora |" in table
    # two epochs of 2 steps: s/step over the second, where both read the shared cache
    for method, r in results.items():
        log = [json.loads(x) for x in (out / method / "train_log.jsonl").read_text().splitlines()]
        assert [row["epoch"] for row in log] == [0, 0, 1, 1]
        assert r["seconds_per_step_after_epoch_1"] == (log[3]["seconds"] - log[1]["seconds"]) / 2
        assert f"{r['seconds_per_step_after_epoch_1']:.2f} |" in table
    assert "s/step: seconds per training step after the first epoch" in table
    # where BLoB's std of A ended, as its summary.json has it; LoRA has none
    std = json.loads((out / "blob" / "summary.json").read_text())["std_of_A"]
    assert results["blob"]["std_of_A"] == std and "std_of_A" not in results["lora"]
    assert f"std of A: {std['q01']:.4g}-{std['q99']:.4g} over every element of" in said
    # both runs share one cache: LoRA's run wrote the frozen blocks' output for the training
    # split and the two evaluation splits, and BLoB's found them there (no new entry)
    for method in results:
        config = json.loads((out / method / "run_config.json").read_text())
        assert config["cache_dir"] == str(out / "cache")
    assert len(list((out / "cache" / "prefix").glob("*.safetensors"))) == 3
    for task in ("arc_easy", "arc_challenge"):
        assert (out / f"reliability_{task}.png").stat().st_size > 0


def test_an_out_folder_that_holds_no_demo_is_refused(tmp_path) -> None:
    """The demo replaces lora/ and blob/ in --out: a user's run of that name, or a folder of
    other files, is refused (before any load) unless --overwrite; a folder a demo wrote (even
    one killed before its results) is not."""
    mine = tmp_path / "mine"
    (mine / "lora").mkdir(parents=True)
    (mine / "lora" / "run_config.json").write_text("{}")
    with pytest.raises(BlobLoraError, match=r"holds files that are not a demo's \(lora\)"):
        check_out(mine, overwrite=False)
    check_out(mine, overwrite=True)
    check_out(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", overwrite=False)
    for marker in DEMO_MARKERS:
        (tmp_path / marker).mkdir()
        demo = tmp_path / marker / "d"
        (demo / "lora").mkdir(parents=True)
        (demo / marker).write_text("")
        check_out(demo, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BlobLoraError, match="is a file"):
        check_out(tmp_path / "file", overwrite=True)


def test_bad_demo_options_fail_before_the_model_loads(tmp_path, data_root, capsys) -> None:
    """A model that does not exist is never reached: each bad option is refused first, and
    nothing is written."""
    base = ["demo", "--model", str(tmp_path / "no_model"), "--data-root", str(data_root)]
    base += ["--out", str(tmp_path / "out"), "--no-progress"]
    for extra, said in (
        (["--eval-size", "0"], "--eval-size must be >= 1"),
        (["--ood-task", "nosuch"], "nosuch"),
        (["--train-split", "train[5:2]"], "train[5:2]"),
        (["--scoring", "letter", "--length-norm", "char"], "applies to cloze scoring"),
        (["--lr", "-1"], "lr"),
    ):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert said in err and "no_model" not in err, (extra, err)
    assert not (tmp_path / "out").exists()


def test_steady_seconds_per_step_skips_the_first_epoch(tmp_path) -> None:
    rows = [(1, 0, 5.0), (2, 0, 9.0), (3, 1, 10.0), (4, 1, 11.5), (5, 2, 12.0)]
    text = "".join(json.dumps({"step": s, "epoch": e, "seconds": t}) + "\n" for s, e, t in rows)
    (tmp_path / "train_log.jsonl").write_text(text)
    assert steady_seconds_per_step(tmp_path) == pytest.approx((12.0 - 9.0) / 3)
    (tmp_path / "train_log.jsonl").write_text(text.splitlines(keepends=True)[0])
    assert steady_seconds_per_step(tmp_path) is None
