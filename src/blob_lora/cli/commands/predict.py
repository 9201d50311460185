"""``blob-lora predict``: answers and their uncertainty for your own questions."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import TextIO

from blob_lora.cli.options import add_eval_noise_override, add_scoring_override, scoring_override
from blob_lora.cli.registry import command
from blob_lora.utils.errors import BlobLoraError

MODE_HELP = (
    "how the N-sample predictive is computed: fold (all N samples in one batched forward; "
    "default), prefix (the deterministic blocks below the first Bayesian one run once and are "
    "reused by every sample), early (samples in small groups until the answer's probability and "
    "entropy settle), prefix-early (both), mean (N = 0: one pass with the mean weights)"
)


def _configure(p: argparse.ArgumentParser) -> None:
    from blob_lora.prediction.api import PREDICT_SEED
    from blob_lora.prediction.fast import MODES, EarlyStop

    rule = EarlyStop()
    p.add_argument("--run", required=True, help="run folder written by 'blob-lora train'")
    p.add_argument(
        "--input",
        required=True,
        help="JSONL questions: {question, choices, [context], [id], [answer]} per line; "
        "'-' reads them from standard input",
    )
    p.add_argument(
        "--out",
        required=True,
        help="JSONL file to write, one row per question (gzip-compressed if it ends in .gz); "
        "'-' writes the rows to standard output (and this command's own lines to standard "
        "error)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="weight samples N averaged; 0 = mean weights (default: the run's, BLoB 10)",
    )
    p.add_argument("--mode", choices=MODES, default="fold", help=MODE_HELP)
    p.add_argument(
        "--fold",
        type=int,
        default=None,
        help="samples per forward pass (default: all N at once); it changes which random draws "
        "each question gets, so numbers move by Monte-Carlo noise, as with --batch-size",
    )
    p.add_argument(
        "--early-tol",
        type=float,
        default=rule.tol,
        help="early modes: stop when the standard errors of the top probability and of the "
        f"entropy are both below this (default {rule.tol})",
    )
    p.add_argument(
        "--early-min",
        type=int,
        default=rule.min_samples,
        help=f"early modes: samples in the first group (default {rule.min_samples})",
    )
    p.add_argument(
        "--early-group",
        type=int,
        default=rule.group_size,
        help=f"early modes: samples per later group (default {rule.group_size})",
    )
    p.add_argument("--batch-size", type=int, default=None, help="questions per batch (run's)")
    p.add_argument("--max-length", type=int, default=None, help="max prompt tokens (run's)")
    p.add_argument(
        "--seed",
        type=int,
        default=PREDICT_SEED,
        help=f"seed of the weight samples (default {PREDICT_SEED})",
    )
    p.add_argument("--model", help="base model, if it moved since training (default: the run's)")
    add_scoring_override(p)
    add_eval_noise_override(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("predict", "answer your own questions (JSONL) with confidence and uncertainty")(_configure)
def run_predict(args: argparse.Namespace) -> int:
    from blob_lora.prediction.inputs import STDIN

    if args.out != STDIN:
        return _predict(args, sys.stdout)
    # the rows go to standard output, alone: every line anything else prints (this command's
    # summary, a library's notice while the model loads) goes to standard error
    rows_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _predict(args, rows_out)


def _predict(args: argparse.Namespace, rows_out: TextIO) -> int:
    from blob_lora.prediction import EarlyStop, Predictor, read_questions
    from blob_lora.prediction.inputs import STDIN
    from blob_lora.prediction.outputs import check_output_path, jsonl_text, write_rows

    if args.eval_samples is not None and args.eval_samples < 0:
        raise BlobLoraError(f"--eval-samples must be >= 0, got {args.eval_samples}")
    # before the (slow) model load and the pass over every question: fail fast
    questions = read_questions(args.input)
    source = None if args.input == STDIN else args.input
    to_stdout = args.out == STDIN
    if to_stdout and args.overwrite:
        raise BlobLoraError("--overwrite is for an --out file; '--out -' writes to standard output")
    out = None if to_stdout else check_output_path(args.out, source, overwrite=args.overwrite)
    early = EarlyStop(args.early_tol, args.early_min, args.early_group)
    early.validate()
    if args.fold is not None and args.fold < 1:
        raise BlobLoraError(f"--fold must be >= 1, got {args.fold}")
    kwargs = {
        "mode": args.mode,
        "fold": args.fold,
        "early": early,
        "seed": args.seed,
        "progress": not args.no_progress,
    }
    for key, value in (
        ("n_samples", args.eval_samples),
        ("batch_size", args.batch_size),
        ("max_length", args.max_length),
        ("eval_noise", args.eval_noise),
    ):
        if value is not None:
            kwargs[key] = value
    if args.scoring or args.length_norm:
        from blob_lora.training.saved_run import read_run_config

        kwargs["scoring"] = scoring_override(args, read_run_config(Path(args.run)))
    predictor = Predictor.from_run(args.run, model=args.model, **kwargs)
    with warnings.catch_warnings():  # a mode's fallback is said once, as the note below
        warnings.filterwarnings("ignore", message="predictive mode")
        rows = predictor.predict(questions)
    if out is None:
        rows_out.write(jsonl_text(rows))
        rows_out.flush()
    else:
        write_rows(out, rows)
    s = predictor.last_summary
    assert s is not None
    line = (
        f"{s.n_examples} questions -> {out or 'standard output'}  (mode {s.mode}, "
        f"N={s.eval_samples}, "
        f"mean samples used {s.mean_samples_used:.2f}, {s.seconds:.1f} s)"
    )
    if s.accuracy is not None:
        line += f"  accuracy on the {s.n_labelled} labelled: {s.accuracy:.3f}"
    print(line)
    if s.note:
        print(f"note: {s.note}")
    if s.n_truncated:
        print(
            f"note: {s.n_truncated} of {s.n_examples} prompts were longer than --max-length "
            f"{predictor.max_length} tokens; their passage or question was cut (never the "
            "options): pass a larger --max-length to score them whole"
        )
    return 0
