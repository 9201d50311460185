"""Tasks: the paper's datasets and a user's own, as multiple-choice prompts scored by answer tokens.

Typical use::

    task = get_task("arc_easy", data_root="/data")          # or $BLOB_LORA_DATA, or the Hub
    ids = option_token_ids(tokenizer, task)                  # (C,) answer-token ids
    ds = MCDataset(task, "train", tokenizer, max_length=256, cache_dir="runs/cache")
    loader = DataLoader(ds, batch_size=8, collate_fn=MCCollator(tokenizer.eos_token_id,
                                                                task.n_options))
    logits = option_logits(model(**batch_inputs, logits_to_keep=1).logits[:, -1],
                           ids, batch["option_mask"])       # (B, C), -inf on absent options
"""

from blob_lora.tasks.dataset import (
    EncodedDataset,
    LengthBucketedBatchSampler,
    MCCollator,
    MCDataset,
    TaskInputs,
    clear_cache,
    encode_examples,
    length_bucketed_sampler,
    length_sorted_batches,
    task_inputs,
    tokenizer_fingerprint,
)
from blob_lora.tasks.examples import MAX_OPTIONS, MIN_OPTIONS, MCExample
from blob_lora.tasks.prompts import ANSWER_CUE
from blob_lora.tasks.registry import MMLU_SUBJECTS, Task, get_task, list_tasks
from blob_lora.tasks.scoring import (
    LENGTH_NORMS,
    SCORING_MODES,
    Scoring,
    option_logits,
    option_token_ids,
    scoring_option_ids,
)
from blob_lora.tasks.splits import SPLIT_SEED, SplitSpec, parse_split

__all__ = [
    "ANSWER_CUE",
    "LENGTH_NORMS",
    "SCORING_MODES",
    "Scoring",
    "MAX_OPTIONS",
    "MIN_OPTIONS",
    "MMLU_SUBJECTS",
    "SPLIT_SEED",
    "EncodedDataset",
    "LengthBucketedBatchSampler",
    "MCCollator",
    "MCDataset",
    "MCExample",
    "SplitSpec",
    "Task",
    "TaskInputs",
    "clear_cache",
    "encode_examples",
    "get_task",
    "length_bucketed_sampler",
    "length_sorted_batches",
    "list_tasks",
    "option_logits",
    "option_token_ids",
    "parse_split",
    "scoring_option_ids",
    "task_inputs",
    "tokenizer_fingerprint",
]
