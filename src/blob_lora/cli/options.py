"""``TrainConfig`` settings as command-line options, with a config file (YAML/TOML) underneath.

Every flat setting of ``TrainConfig`` (``training.config.SETTINGS``: each section's fields) is
one long option and equals a config-file key (dashes or underscores); the command line
overrides the file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import tomllib
import yaml

from blob_lora.methods import METHODS
from blob_lora.tasks.scoring import LENGTH_NORMS, SCORING_MODES, Scoring
from blob_lora.training.config import SETTINGS, TrainConfig
from blob_lora.tuners.blob.config import BlobConfig
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.yaml_file import load_yaml


def _methods_help() -> str:
    """``--method``'s help from the registry, so a new method needs no edit here."""
    default = SETTINGS["method"].default
    one_task = [n for n, m in METHODS.items() if n != default and not m.meta_learned]
    names = [f"{default} (default)", *one_task]
    return ", ".join(names[:-1]) + " or " + names[-1]


HELP: dict[str, str] = {
    "model": "base model: 'smollm2-135m' (embedded, default), a local folder or a Hub name",
    "task": "task name (winogrande_s, winogrande_m, arc_challenge, arc_easy, openbookqa, boolq, "
    "mmlu:<subject>) or a folder with your own train.jsonl/validation.jsonl",
    "method": _methods_help(),
    "recipe": "BLoB's training recipe: paper (default: the authors' optimiser and KL schedule), "
    "no-rescale (the paper's schedule, one KL cycle per epoch: a stronger KL) or elbo-adam "
    "(exact per-example ELBO weight, one AdamW, std at 1e-2); see training/recipes.py; "
    "settings you give explicitly win",
    "out": "run folder to create (refused if it holds another run, see --overwrite/--resume)",
    "data_root": "local dataset folder (default: $BLOB_LORA_DATA, else the Hugging Face Hub)",
    "train_split": "training split, e.g. 'train' or 'validation[:2270]' (slices after a seeded shuffle)",
    "eval_split": "evaluation split (default: the task's own eval split)",
    "max_steps": "number of optimiser steps (overrides --epochs)",
    "epochs": "number of passes over the training split (default 1 when --max-steps is unset)",
    "batch_size": "examples per process per micro-batch",
    "eval_batch_size": "examples per evaluation batch (before weight samples are folded in)",
    "grad_accum": "micro-batches accumulated per optimiser step",
    "gradient_checkpointing": "keep only each decoder block's input in the forward and run "
    "the block again in the backward (transformers' activation checkpointing): less activation "
    "memory for about one more forward per step, the same gradients",
    "length_chunks": "forward each micro-batch as this many chunks of similar length: the same "
    "gradient with less padding (2 CPU cores, batch 8 of ARC-C: 4 chunks take 0.73x the step, "
    "bench/length_chunks.py; default 1)",
    "lr": "AdamW learning rate of LoRA's mean A and B (paper: 1e-4)",
    "kl_lr": "SGD learning rate of the KL step in --optimizer paper (paper: 0.01)",
    "std_lr": "learning rate of the std parameters in --optimizer single (default: --lr)",
    "optimizer": "'paper': AdamW on NLL + SGD on the weighted KL (authors'); 'single': one AdamW on NLL + pi*KL",
    "warmup_ratio": "fraction of steps with linear warmup, followed by linear decay (--optimizer "
    "paper: the authors' step/warmup, the first update at lr 0)",
    "weight_decay": "AdamW weight decay (map defaults to 1e-5)",
    "seed": "random seed (data order, initialisation, weight noise)",
    "max_length": "maximum prompt length in tokens; passages/questions are shortened, never options or the cue",
    "scoring": "how options are scored: letter (the paper's: the answer letter after a prompt "
    "listing the options) or cloze (each option's log-likelihood as the answer's continuation)",
    "length_norm": "cloze only: divide an option's log-likelihood by its token or char count "
    "(lm-evaluation-harness acc_norm = char); none (default) keeps the model's own probability",
    "eval_samples": "weight samples averaged at evaluation; 0 = mean weights (default: the "
    f"method's, BLoB {BlobConfig.eval_samples}); lora and map always run their one "
    "deterministic pass (N = 0)",
    "eval_noise": "BLoB's weight noise at evaluation: sequence (one coherent weight sample per "
    "sequence, the posterior predictive) or token (the authors': token-wise Flipout); other "
    "methods ignore it",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (scaling alpha/r)",
    "lora_dropout": "LoRA dropout (mc-dropout defaults to 0.1)",
    "target_modules": "modules that get LoRA: comma-separated name suffixes and/or regular "
    "expressions matched against full module names (a comma inside brackets stays in its "
    "expression)",
    "prior_std": "BLoB prior std sigma_p",
    "init_std": "BLoB epsilon: the initial std lies in [eps^2/2, eps^2]",
    "std_param": "BLoB std parameterisation: square or softplus",
    "flipout": "BLoB noise decorrelation: token (authors'), sequence or shared",
    "bayesian_layers": "regexes (comma-separated) of LoRA layers that get a std; others stay plain LoRA",
    "kl_schedule": "KL weight schedule: geometric (paper), uniform (1/K) or elbo (1/n)",
    "kl_rescale": "use the authors' dataset rescaling for the KL cycle length (paper setting)",
    "kl_gamma": "gamma of the dataset rescaling",
    "ensemble_size": "number of independently initialised adapters for --method ensemble "
    "(multiswag: of SWAG posteriors)",
    "ensemble_share_seed": "ensemble/multiswag: train member 0 with the run's own --seed, so it "
    "is the plain run of that seed (blob-lora compare then takes that finished run instead of "
    "training it again); off: every member gets seed 1000 * seed + k",
    "swag_start": "swag: fraction of the optimiser steps trained as plain LoRA before SWAG "
    "collects iterates",
    "swag_every": "swag: collect the LoRA weights every N optimiser steps (0: once per epoch, "
    "the paper's)",
    "swag_rank": "swag: deviations kept for the low-rank covariance (K, paper: 5)",
    "swag_lr": "swag: constant learning rate while collecting (default: --lr / 10, the authors')",
    "swag_scale": "swag: covariance scale of the samples (SWAG's 1/2)",
    "checkpoint_every": "write a resumable checkpoint every N steps (0: only at the end)",
    "log_every": "write a line to train_log.jsonl every N steps",
    "log_with": "also log to an Accelerate tracker: tensorboard, wandb, mlflow or all",
    "dtype": "base model dtype: float32, bfloat16 or float16 (adapters stay float32)",
    "load_in_8bit": "load the base model in 8 bit with bitsandbytes (GPU only)",
    "load_in_4bit": "load the base model in 4 bit with bitsandbytes (GPU only)",
    "trust_remote_code": "allow model code from the Hub (off by default)",
    "bucket_by_length": "batch prompts of similar length together (less padding)",
    "prefix_cache": "compute the frozen blocks below the first adapter once per example "
    "and reuse them (same result, 2-3x faster when only the top blocks are adapted)",
    "evaluate": "evaluate on the task's eval split after training",
    "eval_tasks": "extra tasks to evaluate after training (comma-separated), e.g. the OOD protocol",
    "cache_dir": "folder for the tokenisation cache",
    "curve_every": "every N steps score --curve-split and append to RUN/curve.jsonl (0: off)",
    "curve_split": "held-out TRAINING examples for the learning curve, e.g. 'train[:500]' "
    "with --train-split 'train[500:]' (never the evaluation split)",
    "curve_samples": "weight samples for the curve (default: --eval-samples / the method's)",
    # Bayesian-LoRA (tuners/bayesian_lora/config.py: the authors' released configuration)
    "bayes_lora_inducing_rows": "bayesian-lora: rows of each factor's inducing matrix U",
    "bayes_lora_inducing_cols": "bayesian-lora: columns of each factor's inducing matrix U",
    "bayes_lora_prior_std": "bayesian-lora: prior scale of every weight of a LoRA factor",
    "bayes_lora_sqrt_width_scaling": "bayesian-lora: divide --bayes-lora-prior-std by the "
    "square root of the factor's input size",
    "bayes_lora_init_lamda": "bayesian-lora: initial lambda, the scale of q(W | U)'s "
    "conditional covariance relative to p(W | U)'s",
    "bayes_lora_max_lamda": "bayesian-lora: lambda is clamped to at most this",
    "bayes_lora_init_u_std": "bayesian-lora: initial std of the whitened q(U)",
    "bayes_lora_max_u_std": "bayesian-lora: the std of q(U) is clamped to at most this",
    "bayes_lora_init_d": "bayesian-lora: initial diagonal of U's prior row/column covariances",
    "bayes_lora_kl_weight": "bayesian-lora: factor on the KL in the loss, on top of --kl-schedule",
    "bayes_lora_jitter": "bayesian-lora: relative diagonal jitter of the Cholesky factorisations",
    "bayes_lora_layers": "bayesian-lora: regular expression on the LoRA targets' module names "
    "(e.g. model.layers.3.self_attn.q_proj) that are Bayesian; the others stay plain LoRA "
    "(default: the authors' q_proj, k_proj and lm_head; '.*': every target)",
}


def _kind(f) -> tuple[Any, bool]:
    """(scalar type, is_list) of a dataclass field."""
    ann = f.type if not isinstance(f.type, str) else f.type
    text = str(ann)
    if "list" in text:
        return str, True
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return typ, False
    args = [a for a in get_args(ann) if a is not type(None)]
    return (args[0] if args else str), False


def parse_bool(text: str) -> bool:
    """A ``BOOL`` option's value (``--kl-rescale false``): 1/0, true/false, yes/no, on/off."""
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def is_one_folder(text: str) -> bool:
    """Whether a comma-separated list of tasks is one task folder whose name holds a comma
    (the whole text names an existing folder, ``~`` expanded as tasks expand it)."""
    return "," in text and Path(text.strip()).expanduser().is_dir()


def task_names(text: str) -> list[str]:
    """A list of tasks (``--eval-tasks``, ``evaluate --task``): the entries of a
    comma-separated list, or one task folder whose name holds a comma."""
    return [text.strip()] if is_one_folder(text) else comma_list(text)


def list_parser(key: str) -> Callable[[str], list[str]]:
    """How the list setting ``key`` splits its text: tasks may be one folder with a comma in
    its name, other lists (modules, layer expressions) never are."""
    return task_names if key == "eval_tasks" else comma_list


def comma_list(text: str) -> list[str]:
    """The entries of a comma-separated option, split at the commas outside brackets, so that
    a regular expression's own (``.{1,3}``, ``[a,b]``, ``(q|k)``) stays in its entry."""
    parts, depth, start, escaped = [], 0, 0, False
    for i, char in enumerate(text):
        if escaped or char == "\\":  # an escaped bracket or comma is a literal one
            escaped = not escaped
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def add_train_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One long option per flat setting of ``TrainConfig``, typed from its section's field."""
    for key, setting in SETTINGS.items():
        if key in skip:
            continue
        add_setting_option(parser, key, setting.field, HELP.get(key, ""), setting.default)


def add_setting_option(
    parser: argparse.ArgumentParser, key: str, field: Any, help_text: str, default: Any
) -> None:
    """``--<key>`` (dashes for underscores) typed from the dataclass ``field`` (a string
    without one); unset it is ``None``, so a config file's value or the default applies."""
    typ, is_list = _kind(field) if field is not None else (str, False)
    flag = "--" + key.replace("_", "-")
    help_text += f" (default: {default!r})"
    if typ is bool:
        parser.add_argument(
            flag,
            dest=key,
            type=parse_bool,
            nargs="?",
            const=True,
            default=None,
            metavar="BOOL",
            help=help_text,
        )
    elif is_list:
        parser.add_argument(flag, dest=key, type=list_parser(key), default=None, help=help_text)
    else:
        parser.add_argument(flag, dest=key, type=typ, default=None, help=help_text)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Keys equal the long options (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"--config {path}: use a .yaml, .yml, .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc})") from exc
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = load_yaml(text) or {}
        else:
            data = json.loads(text)
    # ValueError: JSON integers beyond Python's digit limit; RecursionError: absurd nesting
    except (tomllib.TOMLDecodeError, yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"--config {path} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option: value")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"--config {path}: option names must be strings, got {bad[:3]!r}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def merge_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainConfig:
    known = set(SETTINGS)
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigError(f"unknown keys in config file: {unknown}")
    merged = dict(file_values)
    merged.update({k: v for k, v in cli_values.items() if k in known and v is not None})
    for key in ("target_modules", "eval_tasks", "bayesian_layers"):
        if isinstance(merged.get(key), str):
            merged[key] = list_parser(key)(merged[key])
    try:
        return TrainConfig(**merged)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def add_scoring_override(parser: argparse.ArgumentParser) -> None:
    """``--scoring`` / ``--length-norm`` for commands that re-open a run (default: the run's)."""
    parser.add_argument(
        "--scoring", choices=SCORING_MODES, default=None, help=HELP["scoring"] + " (run's)"
    )
    parser.add_argument(
        "--length-norm", choices=LENGTH_NORMS, default=None, help=HELP["length_norm"] + " (run's)"
    )


def add_eval_noise_override(parser: argparse.ArgumentParser) -> None:
    """``--eval-noise`` for commands that re-open a run (default: the run's)."""
    from blob_lora.tuners.blob.config import EVAL_NOISE_MODES

    parser.add_argument(
        "--eval-noise", choices=EVAL_NOISE_MODES, default=None, help=HELP["eval_noise"] + " (run's)"
    )


def scoring_override(args: argparse.Namespace, cfg: TrainConfig) -> Scoring:
    """The run's scoring, with the command line's ``--scoring`` / ``--length-norm`` on top.

    Switching the mode drops the run's length normalisation unless it is given again.
    """
    mode = args.scoring or cfg.data.scoring
    norm = args.length_norm or (cfg.data.length_norm if mode == cfg.data.scoring else "none")
    return Scoring(mode, norm)
