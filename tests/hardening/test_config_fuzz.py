"""Property-based tests of the settings: ``TrainConfig`` values, config files, command lines.

Any value ends in a ``ConfigError`` (a ``BlobLoraError`` and ``ValueError``) naming the
option, argparse's own usage error (exit status 2), or a valid config whose values have the
declared types and survive a JSON round trip (what ``run_config.json`` stores). Examples per
test are fixed to bound CI time: 200 + 150 + 150 + 100.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from blob_lora.cli.main import build_parser, main
from blob_lora.cli.options import merge_config, read_config_file
from blob_lora.training import TrainConfig, make_schedule
from blob_lora.training.config import SETTINGS
from blob_lora.utils.errors import BlobLoraError, ConfigError
from tests.hardening import strategies as S

# long generated strings make hypothesis warn about the size of their repr
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

FIELDS = dict(SETTINGS)

GOOD = {
    "model": st.sampled_from(["smollm2-135m", "/models/x"]),
    "task": st.sampled_from(["arc_easy", "winogrande_s", "mmlu:anatomy"]),
    "method": st.sampled_from(["blob", "lora", "map", "mc-dropout", "bayes"]),
    "max_steps": st.one_of(st.none(), st.integers(-2, 10**9)),
    "epochs": st.one_of(st.none(), st.floats(-1, 1e9), st.just(1e308)),
    "batch_size": st.integers(-1, 64),
    "lr": st.one_of(st.floats(-1, 10), st.sampled_from([float("nan"), float("inf")])),
    "seed": st.integers(-1, 2**40),
    "max_length": st.integers(0, 4096),
    "warmup_ratio": st.floats(-0.5, 1.5),
    "lora_dropout": st.floats(-0.5, 1.5),
    "kl_gamma": st.floats(1e-6, 100),
    "target_modules": st.lists(st.sampled_from(["q_proj", "v_proj", "", ".*proj"]), max_size=3),
    "eval_tasks": st.lists(st.sampled_from(["arc_easy", "ood", ""]), max_size=2),
    "bayesian_layers": st.one_of(st.none(), st.lists(st.just("q_proj"), max_size=2)),
    "optimizer": st.sampled_from(["paper", "single", "adam"]),
    "kl_schedule": st.sampled_from(["geometric", "uniform", "elbo", "cosine"]),
    "dtype": st.sampled_from(["float32", "bfloat16", "int8"]),
    "log_with": st.sampled_from([None, "tensorboard", "nope"]),
    "evaluate": st.booleans(),
    "kl_rescale": st.booleans(),
}


# plausible (often out-of-range) values for some options, plus junk for up to two options
config_values = st.builds(
    lambda good, junk: {**good, **junk},
    st.fixed_dictionaries({}, optional=GOOD),
    st.dictionaries(st.sampled_from(list(FIELDS)), S.json_values, max_size=2),
)


def _check_valid(cfg: TrainConfig) -> None:
    event("valid")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for name in ("batch_size", "grad_accum", "lora_r", "max_length", "seed", "log_every"):
        assert type(cfg.get(name)) is int
    assert all(isinstance(t, str) and t for t in cfg.lora.target_modules)
    # what the trainer derives from the values works too
    schedule = make_schedule(
        cfg.kl.kl_schedule, 100, 25, cfg.loop.batch_size, cfg.kl.kl_rescale, cfg.kl.kl_gamma
    )
    assert schedule.weight(1) >= 0.0


def _refused(exc: BlobLoraError) -> None:
    event("refused")
    assert isinstance(exc, ConfigError) and isinstance(exc, ValueError), repr(exc)


@settings(max_examples=200, deadline=None)
@given(values=config_values)
def test_train_config_values(values) -> None:
    try:
        cfg = TrainConfig(**values)
    except ConfigError as exc:
        _refused(exc)
        assert str(exc).startswith(("--", "unknown method")), str(exc)
        return
    try:
        _check_valid(cfg)
    except ConfigError as exc:  # e.g. a --kl-gamma so small that the KL cycle overflows
        _refused(exc)


def _key(name: str) -> st.SearchStrategy:
    return st.sampled_from([name, name.replace("_", "-")])


file_keys = st.one_of(st.sampled_from(list(FIELDS)).flatmap(_key), st.text(max_size=6))
file_mapping = st.dictionaries(file_keys, st.one_of(S.json_values, *GOOD.values()), max_size=6)


def _toml(data: dict) -> str:
    lines = []
    for k, v in data.items():
        lines.append(f"{json.dumps(k)} = {json.dumps(v)}")  # JSON scalars/arrays are mostly TOML
    return "\n".join(lines) + "\n"


@settings(max_examples=150, deadline=None)
@given(
    data=st.one_of(file_mapping, S.json_values),
    fmt=st.sampled_from(["yaml", "json", "toml", "yml"]),
    raw=st.one_of(st.none(), st.binary(max_size=40), st.sampled_from(["1: 2\n", "? [a]\n: b\n"])),
)
def test_config_files(data, fmt, raw) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"cfg.{fmt}"
        if isinstance(raw, bytes):
            path.write_bytes(raw)
        elif raw is not None:
            path.write_text(raw)
        elif fmt in ("yaml", "yml"):
            path.write_text(yaml.safe_dump(data, allow_unicode=True), errors="surrogatepass")
        elif fmt == "json":
            path.write_text(json.dumps(data))
        else:
            path.write_text(_toml(data) if isinstance(data, dict) else json.dumps(data))
        try:
            cfg = merge_config(read_config_file(path), {})
        except ConfigError as exc:
            _refused(exc)
            return
        try:
            _check_valid(cfg)
        except ConfigError as exc:
            _refused(exc)


OPTIONS = ["--" + n.replace("_", "-") for n in FIELDS]
argv_values = st.one_of(
    st.sampled_from(["0", "-1", "1", "1e-4", "nan", "inf", "true", "no", "", "a,b", ",", "x"]),
    st.text(S.any_char, max_size=8),
)


@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(OPTIONS), argv_values), max_size=5))
def test_command_lines(pairs) -> None:
    argv = ["train", "--out", "/nonexistent/run"]
    for flag, value in pairs:
        argv += [flag, value]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's usage error: one line, status 2
        event("usage error")
        assert exc.code == 2
        return
    try:
        cfg = merge_config({}, vars(args))
    except ConfigError as exc:
        _refused(exc)
        return
    try:
        _check_valid(cfg)
    except ConfigError as exc:
        _refused(exc)


@settings(max_examples=100, deadline=None)
@given(values=config_values)
def test_resume_comparison_of_any_stored_config(values) -> None:
    """``--resume`` compares against run_config.json: any stored value is compared, never
    crashes (the stored file may have been edited by hand)."""
    from blob_lora.training.run_dir import check_run_dir

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        stored = {**TrainConfig().to_dict(), **values}
        (out / "run_config.json").write_text(json.dumps(stored, allow_nan=True))
        try:
            assert check_run_dir(out, TrainConfig().to_dict(), overwrite=False, resume=True)
            event("resumable")
        except BlobLoraError as exc:
            event("refused")
            assert "cannot resume" in str(exc)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--epochs", "1e300"], "--epochs must be <="),
        (["--seed", str(2**40)], "--seed must be <="),
        (["--target-modules", ","], "--target-modules must name at least one module"),
        (["--kl-gamma", "0.001"], "--kl-gamma 0.001 is too small"),
        (["--max-length", "8"], "--max-length must be an integer >= 16"),
        (["--target-modules", "no_such_proj"], "Target modules {'no_such_proj'} not found"),
    ],
)
def test_cli_refuses_before_writing_anything(assets, tmp_path, capsys, extra, needle) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", str(assets.model), "--task", str(assets.task), "--out", str(out)]
    assert main([*argv, "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_bad_config_file_is_one_clear_line(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cases = {b"1: 2\n": "option names must be strings", b"lr: \xff\n": "not UTF-8 text"}
    for content, needle in cases.items():
        cfg.write_bytes(content)
        assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
