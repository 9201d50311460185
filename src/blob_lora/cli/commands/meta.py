"""``meta-train`` and ``meta-evaluate``: ABMLL over a collection of tasks (issue 24).

A method that learns from many tasks does not fit ``train`` (one task, one run): these two
commands run the multi-task protocol of ``pipeline/meta_*.py``. Every field of
``MetaConfig`` is a long option (``--k-shot``) and config-file key, every field of
``AbmllConfig`` one with the prefix ``abmll`` (``--abmll-beta``).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from blob_lora.cli.options import add_setting_option, read_config_file
from blob_lora.cli.registry import command
from blob_lora.models.config import BaseModelConfig
from blob_lora.pipeline.meta_baselines import BASELINES
from blob_lora.pipeline.meta_config import MetaConfig
from blob_lora.pipeline.meta_loop import DEFAULT_CHECKPOINT_EVERY
from blob_lora.tuners.abmll import AbmllConfig
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.settings import SettingError, flag

META_HELP: dict[str, str] = {
    "tasks": "the task collection: 'mmlu' (57 subjects), 'paper' (the six BLoB tasks), a "
    "comma-separated list of tasks, or a folder whose sub-folders are your own JSONL tasks",
    "method": "the meta-learning method",
    "model": "base model: 'smollm2-135m' (embedded), a local folder or a Hub name",
    "dtype": "base model dtype (float32, bfloat16, float16)",
    "data_root": "local dataset folder (default: $BLOB_LORA_DATA, else the Hugging Face Hub)",
    "split": "each task's questions the protocol draws from (default: its eval split)",
    "meta_test_tasks": "tasks held out for meta-evaluate, drawn by --seed",
    "k_shot": "support questions per task (adaptation), in meta-training and at meta-test",
    "query_size": "query questions per task and meta-training step",
    "eval_size": "questions scored per held-out task (default: all but its support set)",
    "meta_steps": "outer optimiser steps",
    "meta_batch_tasks": "tasks per outer step",
    "lr": "AdamW learning rate of the global parameters",
    "batch_size": "questions per forward pass",
    "max_length": "maximum prompt length in tokens",
    "overlong": "a question that cannot fit --max-length even with its passage and question "
    "cut: 'error' stops before training and says which and what length fits; 'drop' leaves "
    "it out of its task (listed as 'overlong' in tasks.json and meta_eval*.json)",
    "scoring": "letter or cloze, as train's --scoring",
    "length_norm": "cloze only: none, token or char, as train's --length-norm (every task)",
    "seed": "the task split, the question draws and the weight samples",
    "lora_r": "rank of every ABMLL LoRA pair",
    "lora_dropout": "LoRA dropout on the adapted layers' input",
    "lora_alpha": "LoRA alpha (the mean's scaling is alpha / r)",
    "target_modules": "module name suffixes to adapt, comma-separated",
}
ABMLL_PREFIX = "abmll_"
#: train's ``--prefix-cache`` (``BaseModelConfig.prefix_cache``), spelt and defaulted alike
PREFIX_CACHE = "prefix_cache"


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _add_prefix_cache_option(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--prefix-cache BOOL`` as ``train`` has it; not a setting of the run (the results are
    the same either way), so a run may be resumed with it switched."""
    (f,) = (f for f in fields(BaseModelConfig) if f.name == PREFIX_CACHE)
    add_setting_option(p, PREFIX_CACHE, f, help_text, _default(f))


def _configure_meta_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        help="run folder to create (refused if it holds a run, see --resume / --overwrite)",
    )
    p.add_argument(
        "--config",
        help="YAML/TOML/JSON file whose keys are these long options; the command line wins",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh over the meta-train run in --out; the old run is kept until the "
        "new one has finished (an unfinished one's checkpoints in --out/checkpoints-replaced)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its newest intact checkpoint (a "
        "damaged newer one is skipped with a warning); the settings must be the run's, and "
        "the result is the uninterrupted run's (bit for bit on a CPU). Not automatic, as "
        "for train: without it a folder holding a run is refused",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="write a checkpoint (global parameters, AdamW state, RNG states, log) into "
        "--out/checkpoints every N meta-steps; 0: none. Any N gives the same result "
        f"(default: {DEFAULT_CHECKPOINT_EVERY})",
    )
    _add_prefix_cache_option(
        p,
        "run the frozen blocks below the first adapter once per support and query batch of a "
        "meta-step, not at every inner step (the same losses; faster when only the top blocks "
        "are adapted)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in fields(MetaConfig):
        add_setting_option(p, f.name, f, META_HELP.get(f.name, ""), _default(f))
    for f in fields(AbmllConfig):
        help_text = f"ABMLL's {f.name} (AbmllConfig; sources in methods/abmll.py)"
        add_setting_option(p, ABMLL_PREFIX + f.name, f, help_text, _default(f))


#: what a run does with its folder, chosen when it is started, never stored in a config file
COMMAND_LINE_ONLY = ("out", "config", "overwrite", "resume", "no_progress")


def _values(args: argparse.Namespace) -> dict[str, Any]:
    """The config file's values, the command line's over them. A config file that sets a
    command-line-only option is refused (its value would otherwise be silently dropped: the
    flags' ``False`` defaults win over it)."""
    values = read_config_file(args.config) if args.config else {}
    only = sorted(set(values) & set(COMMAND_LINE_ONLY))
    if only:
        named = ", ".join(flag(k) for k in only)
        raise ConfigError(
            f"--config {args.config}: {named}: command-line only, not a config-file key"
        )
    values.update({k: v for k, v in vars(args).items() if v is not None})
    return values


def checkpoint_every_of(args: argparse.Namespace) -> int:
    """``--checkpoint-every`` (or the config file's ``checkpoint_every``, or the default)."""
    return _values(args).get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)


def prefix_cache_of(args: argparse.Namespace) -> bool:
    """``--prefix-cache`` (or the config file's ``prefix_cache``, or on); a config file's
    value that is not a boolean is refused naming the option."""
    value = _values(args).get(PREFIX_CACHE, True)
    if not isinstance(value, bool):
        raise ConfigError(f"{flag(PREFIX_CACHE)} must be true or false, got {value!r}")
    return value


def settings_of(args: argparse.Namespace) -> tuple[MetaConfig, AbmllConfig]:
    """The run's settings: the config file's values, the command line's over them; an error
    names the option."""
    command_keys = {*COMMAND_LINE_ONLY, "checkpoint_every", PREFIX_CACHE, "command", "_run"}
    values = {k: v for k, v in _values(args).items() if k not in command_keys}
    return settings_from_values(values)


def settings_from_values(values: dict[str, Any]) -> tuple[MetaConfig, AbmllConfig]:
    """``MetaConfig`` and ``AbmllConfig`` from config-file keys (``k_shot``, ``abmll_beta``),
    as ``meta-train --config`` reads them; an unknown key or a bad value is a ``ConfigError``
    naming the option."""
    meta_keys = {f.name for f in fields(MetaConfig)}
    abmll_keys = {ABMLL_PREFIX + f.name for f in fields(AbmllConfig)}
    unknown = sorted(set(values) - meta_keys - abmll_keys)
    if unknown:
        raise ConfigError(f"unknown keys in config file: {unknown}")
    values = dict(values)
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = [t.strip() for t in values["target_modules"].split(",")]
    meta = MetaConfig(**{k: v for k, v in values.items() if k in meta_keys})
    abmll = {k[len(ABMLL_PREFIX) :]: v for k, v in values.items() if k in abmll_keys}
    try:
        return meta, AbmllConfig(**abmll)
    except SettingError as exc:  # named as the option a user typed
        raise ConfigError(f"{flag(ABMLL_PREFIX + exc.setting)} {exc.problem}") from None


@command("meta-train", "meta-learn ABMLL's global parameters over a collection of tasks")(
    _configure_meta_train
)
def run_meta_train(args: argparse.Namespace) -> int:
    from blob_lora.pipeline.meta_train import meta_train

    meta, abmll = settings_of(args)
    summary = meta_train(
        meta,
        args.out,
        abmll,
        overwrite=args.overwrite,
        resume=args.resume,
        checkpoint_every=checkpoint_every_of(args),
        progress=not args.no_progress,
        prefix_cache=prefix_cache_of(args),
    )
    print(f"run folder: {args.out}")
    held_out = ", ".join(summary["meta_test"])
    print(f"meta-trained on {len(summary['meta_train'])} tasks; held out: {held_out}")
    return 0


def _configure_meta_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by 'blob-lora meta-train'")
    p.add_argument("--out", help="folder for meta_eval.json (default: the run folder)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a meta_eval*.json of another evaluation (another run, baseline or N)",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="weight samples averaged; 0 = the task posterior's means (default: the run's; "
        "for --baseline blob-support BLoB's 10; the other baselines have no samples)",
    )
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        help="score a baseline through the run's protocol instead of the run, with ABMLL's "
        "inner steps and rate as every fit's budget: zero-shot (the pretrained model), "
        "lora-support (a fresh LoRA fitted on each support set), blob-support (a fresh BLoB "
        "fitted on each support set on the ELBO, N-sample predictive) or multitask-lora "
        "(LoRA trained on the meta-train tasks pooled, kept in the run folder, then fitted on "
        "each support set); written to meta_eval_<baseline>.json",
    )
    _add_prefix_cache_option(
        p,
        "run the frozen blocks below the first adapter once per support batch of an "
        "adaptation and once per scored question, not at every inner step and weight sample "
        "(the same metrics up to float rounding; faster when only the top blocks are adapted)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command(
    "meta-evaluate",
    "adapt a meta-trained run to each held-out task's support set and score the task",
)(_configure_meta_evaluate)
def run_meta_evaluate(args: argparse.Namespace) -> int:
    from blob_lora.pipeline.meta_evaluate import meta_evaluate

    result = meta_evaluate(
        args.run,
        args.out,
        eval_samples=args.eval_samples,
        baseline=args.baseline,
        progress=not args.no_progress,
        prefix_cache=args.prefix_cache is not False,
        overwrite=args.overwrite,
    )
    print(f"method: {result['method']}  (N = {result['eval_samples']}, k = {result['k_shot']})")
    for name, m in result["tasks"].items():
        print(_line(name, m))
    print(_line("mean", result["mean"]))
    return 0


def _line(name: str, m: dict[str, float]) -> str:
    return (
        f"{name}: acc {m['accuracy']:.3f}  ece {m['ece']:.3f}  nll {m['nll']:.3f}  "
        f"brier {m['brier']:.3f}"
    )
