"""The README's "Python API" block runs as written (real SmolLM2-135M, a few steps)."""

from __future__ import annotations

import re

from tests.conftest import REPO


def _python_api_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- python-api -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its python-api block"
    return match.group(1)


def test_readme_python_api_block_runs_as_written(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setenv("BLOB_LORA_DATA", str(data_root))
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_api_block(), "README.md:python-api", "exec"), {})
    printed = capsys.readouterr().out.split("\n")
    accuracy = float(printed[0])
    ece, nll = (float(x) for x in printed[1].split())
    assert 0 <= accuracy <= 1 and 0 <= ece <= 1 and nll > 0
    assert printed[2].split()[0] in ("sunlight", "salt", "sand")
    run = tmp_path / "runs" / "api-example"
    assert (run / "adapter").is_dir() and (run / "eval" / "openbookqa" / "metrics.json").is_file()
