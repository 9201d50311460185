"""`blob-lora demo` end to end on a tiny random model: both methods train, are re-opened from
their run folders, evaluated in and out of distribution with the demo's scoring, and the table
reports what the metrics files hold."""

from __future__ import annotations

import json

from blob_lora.cli.main import main
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
    argv += ["--train-split", "train[:8]", "--eval-size", "4", "--epochs", "1"]
    argv += ["--batch-size", "4", "--eval-samples", "2", "--max-length", "512"]
    argv += ["--length-norm", length_norm, "--no-kl-rescale", "--no-progress"]
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
