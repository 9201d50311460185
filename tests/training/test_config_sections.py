"""``TrainConfig`` by concern: each section refuses its own bad values naming the option,
flat keys round-trip, old ``run_config.json`` files still load, and the Bayesian-LoRA options
reach the method's ``BayesianLoraConfig``."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from blob_lora.cli.main import build_parser
from blob_lora.cli.options import merge_config, read_config_file
from blob_lora.methods import get_method
from blob_lora.methods.bayesian_lora import bayesian_lora_config_from
from blob_lora.methods.blob import blob_config_from
from blob_lora.training.config import SECTIONS, SETTINGS, TrainConfig
from blob_lora.training.saved_run import read_run_config
from blob_lora.tuners.bayesian_lora.config import BayesianLoraConfig
from blob_lora.tuners.blob.config import BlobConfig
from blob_lora.utils.errors import ConfigError
from tests.factories import TARGETS, tiny_llama

# one bad value per section: (flat key, value, the message's start)
BAD = [
    ("dtype", "int8", "--dtype must be one of ('float32', 'bfloat16', 'float16'), got 'int8'"),
    ("max_length", 8, "--max-length must be an integer >= 16, got 8"),
    ("lr", 0.0, "--lr must be a finite number > 0, got 0.0"),
    ("kl_gamma", float("nan"), "--kl-gamma must be a finite number > 0, got nan"),
    ("lora_r", 0, "--lora-r must be an integer >= 1, got 0"),
    ("prior_std", -1, "--prior-std must be a finite number > 0, got -1"),
    ("bayes_lora_inducing_rows", 0, "--bayes-lora-inducing-rows must be an integer >= 1, got 0"),
    ("swag_rank", 1, "--swag-rank must be an integer >= 2, got 1"),
    ("ensemble_size", True, "--ensemble-size must be an integer >= 1, got True"),
    ("eval_batch_size", "8", "--eval-batch-size must be an integer >= 1, got '8'"),
    ("method", "", "--method must be a non-empty string, got ''"),
    # an optional string is unset (None) or a real value, never "" (read as unset by some)
    ("eval_split", "", "--eval-split must be a non-empty string, got ''"),
    ("train_split", " ", "--train-split must be a non-empty string, got ' '"),
    ("prefix_cache", "no", "--prefix-cache must be true or false, got 'no'"),
    # an expression that does not compile is refused by name, in either setting that takes one
    (
        "target_modules",
        ["[q_proj", "lm_head"],
        "--target-modules has an invalid regular expression '[q_proj': unterminated character "
        "set at position 0",
    ),
    (
        "bayesian_layers",
        ["(lm_head"],
        "--bayesian-layers has an invalid regular expression '(lm_head': missing ), "
        "unterminated subpattern at position 0",
    ),
]


def test_every_section_has_a_bad_value_above() -> None:
    covered = {SETTINGS[key].section for key, _, _ in BAD}
    assert covered == {*SECTIONS, None}


@pytest.mark.parametrize(("key", "value", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_section_refuses_a_bad_value_naming_the_option(key, value, message) -> None:
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**{key: value})
    assert str(exc.value) == message


def test_a_section_used_alone_names_its_field() -> None:
    with pytest.raises(ConfigError, match=r"^BlobConfig\.prior_std must be a finite number > 0"):
        BlobConfig(prior_std=0)
    with pytest.raises(ConfigError, match=r"^BayesianLoraConfig\.inducing_rows must be"):
        BayesianLoraConfig(inducing_rows=0)


def test_unknown_keys_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown settings \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="eval_samples"):  # BlobConfig's is not a run key
        TrainConfig(bayes_lora_eval_samples=3)


def test_flat_keys_are_every_section_field_once() -> None:
    keys = [k for k, s in SETTINGS.items() if s.section is not None]
    for attr, section in SECTIONS.items():
        skip = getattr(section, "NOT_RUN_SETTINGS", ())
        names = [f.name for f in fields(section) if f.name not in skip]
        assert [SETTINGS[k].name for k in keys if SETTINGS[k].section == attr] == names
    assert set(TrainConfig().to_dict()) == set(SETTINGS)


def test_flat_keys_round_trip() -> None:
    cfg = TrainConfig(
        lr=3e-4,
        prior_std=0.1,
        swag_rank=3,
        eval_tasks=["arc_easy"],
        bayesian_layers=["q_proj"],
        bayes_lora_kl_weight=0.5,
        recipe="elbo-adam",
    )
    assert (cfg.loop.lr, cfg.blob.prior_std, cfg.swag.rank, cfg.kl.std_lr) == (3e-4, 0.1, 3, 1e-2)
    assert cfg.bayes_lora.kl_weight == 0.5 and cfg.evaluation.eval_tasks == ["arc_easy"]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.replace(lr=1e-3).loop.lr == 1e-3 and cfg.replace(lr=1e-3).blob == cfg.blob


def test_an_old_run_config_without_the_bayesian_lora_keys_loads(tmp_path) -> None:
    old = {k: v for k, v in TrainConfig(lr=2e-4).to_dict().items() if "bayes_lora" not in k}
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    cfg = read_run_config(tmp_path)
    assert cfg.loop.lr == 2e-4 and cfg.bayes_lora == BayesianLoraConfig()
    completed = TrainConfig.stored_with_defaults(old)
    assert completed == TrainConfig(lr=2e-4).to_dict()  # resume and compare see no change


def test_an_old_bayesian_lora_run_reads_as_every_target_bayesian(tmp_path) -> None:
    """Such a run made every LoRA target Bayesian: the later default (the authors' layers)
    would describe another model, so resuming or comparing it against the default differs,
    while the runs of other methods, which never read the setting, do not."""
    new = TrainConfig(method="bayesian-lora", lr=2e-4).to_dict()
    old = {k: v for k, v in new.items() if k != "bayes_lora_layers"}
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    assert read_run_config(tmp_path).bayes_lora == BayesianLoraConfig(layers=".*")
    completed = TrainConfig.stored_with_defaults(old)
    assert completed == {**new, "bayes_lora_layers": ".*"} != new
    (tmp_path / "run_config.json").write_text(json.dumps(new))
    assert read_run_config(tmp_path).bayes_lora == BayesianLoraConfig()
    assert TrainConfig.stored_with_defaults(new) == new


def test_a_bayesian_lora_option_on_the_cli_reaches_the_method(tmp_path) -> None:
    argv = ["train", "--method", "bayesian-lora", "--out", str(tmp_path / "run")]
    argv += ["--bayes-lora-inducing-rows", "5", "--bayes-lora-sqrt-width-scaling", "false"]
    argv += ["--target-modules", ",".join(TARGETS), "--config", str(tmp_path / "c.yaml")]
    (tmp_path / "c.yaml").write_text("bayes-lora-kl-weight: 0.25\neval_samples: 2\n")
    args = build_parser().parse_args(argv)
    cfg = merge_config(read_config_file(args.config), vars(args))
    settings = bayesian_lora_config_from(cfg)
    assert (settings.inducing_rows, settings.sqrt_width_scaling) == (5, False)
    assert (settings.kl_weight, settings.eval_samples, settings.inducing_cols) == (0.25, 2, 9)
    model = get_method("bayesian-lora").build(tiny_llama(), cfg)
    assert model.bayesian_lora_configs["default"] == settings
    assert cfg.to_dict()["bayes_lora_inducing_rows"] == 5  # stored in run_config.json


def test_the_methods_default_sample_count_lives_in_their_options_class() -> None:
    cfg = TrainConfig()
    assert cfg.evaluation.eval_samples is None
    assert blob_config_from(cfg).eval_samples == BlobConfig.eval_samples
    assert get_method("blob").samples_by_default == BlobConfig.eval_samples
    assert bayesian_lora_config_from(cfg).eval_samples == BayesianLoraConfig.eval_samples
    assert get_method("bayesian-lora").samples_by_default == BayesianLoraConfig.eval_samples


def test_lora_section_builds_pefts_lora_config() -> None:
    cfg = TrainConfig(lora_r=4, lora_alpha=8, target_modules=[".*q_proj"])
    peft = cfg.lora.peft_config(dropout=0.1)
    assert (peft.r, peft.lora_alpha, peft.lora_dropout) == (4, 8, 0.1)
    assert peft.target_modules == ".*q_proj"  # one regular expression: PEFT's full match
    assert get_method("mc-dropout").lora_config(cfg).lora_dropout == 0.1


def test_an_old_run_config_with_empty_strings_and_a_truthy_prefix_cache_loads() -> None:
    """Files written when "" meant unset and any truthy prefix_cache turned the cache on read
    back as what they meant (today's config refuses both spellings when given fresh)."""
    stored = {**TrainConfig().to_dict(), "eval_split": "", "data_root": "", "prefix_cache": 1}
    cfg = TrainConfig.from_dict(TrainConfig.stored_with_defaults(stored))
    assert (cfg.evaluation.eval_split, cfg.data.data_root, cfg.base.prefix_cache) == (
        None,
        None,
        True,
    )
    off = TrainConfig.stored_with_defaults({"prefix_cache": 0, "train_split": "train[:8]"})
    assert off["prefix_cache"] is False and off["train_split"] == "train[:8]"


def test_the_settings_a_method_does_not_read_are_named() -> None:
    """``unread_settings``: a method-specific setting is unread by the methods that do not
    declare its section, and by those that declare it but set it themselves; the settings
    every method reads never are. The declarations name real sections and settings."""
    from blob_lora.methods.registry import METHODS
    from blob_lora.training.config import METHOD_SECTIONS, SECTIONS, SETTINGS, unread_settings

    keys = ["lr", "lora_r", "eval_samples", "prior_std", "kl_lr", "eval_noise", "swag_rank"]
    keys += ["bayesian_layers", "ensemble_size", "bayes_lora_prior_std", "flipout"]
    unread = {m: unread_settings(m, keys) for m in ("lora", "blob", "tfb")}
    assert unread["lora"] == sorted(keys[3:])
    assert unread["blob"] == ["bayes_lora_prior_std", "ensemble_size", "swag_rank"]
    # TFB predicts as BLoB (eval_noise) but sets the std itself, on every layer, with no KL
    tfb = ["bayes_lora_prior_std", "bayesian_layers", "ensemble_size", "flipout", "kl_lr"]
    tfb += ["prior_std"]
    assert unread["tfb"] == [*tfb, "swag_rank"]
    # Bayesian-LoRA has a KL (its schedule) but no std parameters for --kl-lr to step
    assert unread_settings("bayesian-lora", ["kl_schedule", "kl_lr", "lr"]) == ["kl_lr"]
    assert unread_settings("multiswag", ["swag_rank", "ensemble_size"]) == []
    assert set(SECTIONS) >= METHOD_SECTIONS
    for method in METHODS.values():
        assert method.reads_sections <= METHOD_SECTIONS, method.name
        assert all(SETTINGS[k].section in method.reads_sections for k in method.ignores_settings)
