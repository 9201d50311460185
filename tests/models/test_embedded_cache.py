"""The embedded model is converted once from GGUF into a transformers folder and loaded from
there (``models.loading``): the folder must give the very model and tokenizer the GGUF file
gives, be made again when what it was made from changes, never be seen half-written, and never
block loading where it cannot be written."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from blob_lora.models import loading
from tests.factories import tiny_base, tiny_tokenizer

torch.set_num_threads(1)


def _texts(data_root: Path) -> list[str]:
    """Real prompts of every paper task (questions, options, passages) and odd characters."""
    texts = [" yes", " no", "ÄÖÜ ß 東京 🙂  two  spaces\n\ttab", "Question: x\nAnswer:"]
    for name in ("arc_easy/validation", "openbookqa/validation", "boolq/validation"):
        for path in sorted((data_root / name.split("/")[0]).glob(f"{name.split('/')[1]}*.jsonl")):
            lines = path.read_text(encoding="utf-8").splitlines()[:60]
            texts += [json.dumps(json.loads(line), ensure_ascii=False) for line in lines]
    for path in sorted((data_root / "winogrande").glob("train_s*.jsonl")):
        texts += path.read_text(encoding="utf-8").splitlines()[:60]
    return texts


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_converted_folder_is_the_gguf_model_bit_for_bit(tmp_path, monkeypatch, data_root):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("BLOB_LORA_CACHE", str(tmp_path / "cache"))
    gguf = loading._embedded_gguf("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    direct_tok = loading._tokenizer_from(str(gguf.parent), gguf_file=gguf.name)
    model, tok = loading.load_model_and_tokenizer("smollm2-135m")
    folder = loading.embedded_folder("smollm2-135m")
    assert folder.parent == tmp_path / "cache" / "models" and (folder / "config.json").is_file()

    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    # the same config but for where it was read from and the GGUF marker, which made
    # transformers treat the dequantised float32 model as quantised (no .to(), no saving)
    a, b = model.config.to_dict(), direct.config.to_dict()
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {
        "_name_or_path",
        "quantization_config",
    }
    assert "quantization_config" not in a and b["quantization_config"]["dequantize"] is False
    assert getattr(model, "hf_quantizer", None) is None

    for text in _texts(data_root):
        assert tok(text)["input_ids"] == direct_tok(text)["input_ids"], text
        offsets = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        direct_offsets = direct_tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert offsets["offset_mapping"] == direct_offsets["offset_mapping"], text
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.padding_side) == (
        direct_tok.pad_token_id,
        direct_tok.eos_token_id,
        direct_tok.bos_token_id,
        "left",
    )
    assert tok.chat_template == direct_tok.chat_template
    ids = torch.tensor(
        [direct_tok("Question: What do plants need?\nAnswer: sunlight")["input_ids"]]
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


def test_the_folder_is_made_again_when_its_sources_change(tmp_path, monkeypatch):
    import transformers

    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(loading, "_embedded_gguf", lambda name: gguf)
    monkeypatch.setenv("BLOB_LORA_CACHE", str(tmp_path / "cache"))
    first = loading.embedded_folder("smollm2-135m")
    assert first == loading.embedded_folder("smollm2-135m")
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("smollm2-135m-")
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a reinstalled package
    reinstalled = loading.embedded_folder("smollm2-135m")
    assert reinstalled != first
    monkeypatch.setattr(transformers, "__version__", "0.0.0-other")
    assert loading.embedded_folder("smollm2-135m") not in (first, reinstalled)  # other converter
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("BLOB_LORA_CACHE")
    assert loading.cache_root() == tmp_path / "xdg" / "blob_lora"


def _fake_gguf_loading(monkeypatch, tmp_path):
    """A conversion that 'reads' the GGUF file as a tiny model (the real one takes a minute)."""
    import transformers

    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    tok = tiny_tokenizer()
    base = tiny_base(tok)
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(location, **kwargs):
        return base if "gguf_file" in kwargs else real(location, **kwargs)

    monkeypatch.setattr(loading, "_embedded_gguf", lambda name: gguf)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(loading, "_tokenizer_from", lambda *a, **k: tok)
    return base


def test_a_folder_another_process_made_first_is_kept(tmp_path, monkeypatch):
    _fake_gguf_loading(monkeypatch, tmp_path)
    dest = tmp_path / "cache" / "m"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text('{"made_by": "the other process"}')
    assert loading.convert_embedded("smollm2-135m", dest) == dest
    assert json.loads((dest / "config.json").read_text()) == {"made_by": "the other process"}
    assert [p.name for p in dest.parent.iterdir()] == ["m"]  # no temporary folder left


def test_a_conversion_that_fails_leaves_nothing(tmp_path, monkeypatch):
    _fake_gguf_loading(monkeypatch, tmp_path)

    def disk_full(model, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loading, "_save_dequantized", disk_full)
    dest = tmp_path / "cache" / "m"
    with pytest.raises(OSError, match="No space"):
        loading.convert_embedded("smollm2-135m", dest)
    assert list(dest.parent.iterdir()) == []


def test_an_unwritable_cache_falls_back_to_the_gguf_file(tmp_path, monkeypatch):
    _fake_gguf_loading(monkeypatch, tmp_path)
    monkeypatch.setenv("BLOB_LORA_CACHE", str(tmp_path / "cache"))

    def read_only(name, dest):
        raise PermissionError(13, "Permission denied", str(dest))

    monkeypatch.setattr(loading, "convert_embedded", read_only)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        location, extra = loading._embedded_location("smollm2-135m")
    assert (location, extra) == (str(tmp_path / "pkg"), {"gguf_file": "model.gguf"})
    assert any("reading its GGUF file directly" in str(w.message) for w in caught)


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_converted_folder_loads_as_the_model_it_was_made_from(tmp_path, monkeypatch):
    base = _fake_gguf_loading(monkeypatch, tmp_path)
    base.config.tie_word_embeddings = True
    base.tie_weights()
    monkeypatch.setenv("BLOB_LORA_CACHE", str(tmp_path / "cache"))
    loaded, _ = loading.load_model_and_tokenizer("smollm2-135m")
    assert (loading.embedded_folder("smollm2-135m") / "model.safetensors").is_file()
    assert _same(loaded, base)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


@pytest.mark.parametrize("damage", ["cut short", "deleted"])
def test_a_damaged_converted_folder_is_converted_again(tmp_path, monkeypatch, damage):
    base = _fake_gguf_loading(monkeypatch, tmp_path)
    monkeypatch.setenv("BLOB_LORA_CACHE", str(tmp_path / "cache"))
    loading.load_model_and_tokenizer("smollm2-135m")
    weights = loading.embedded_folder("smollm2-135m") / "model.safetensors"
    if damage == "deleted":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="is damaged"):
        loaded, _ = loading.load_model_and_tokenizer("smollm2-135m")
    assert _same(loaded, base)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded, _ = loading.load_model_and_tokenizer("smollm2-135m")  # whole again
    assert _same(loaded, base)


def test_a_users_folder_with_cut_weights_is_a_clear_error(tmp_path):
    from blob_lora.utils.errors import BlobLoraError

    tok = tiny_tokenizer()
    folder = tmp_path / "mine"
    tiny_base(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BlobLoraError, match="could not load model"):
        loading.load_model_and_tokenizer(str(folder))
