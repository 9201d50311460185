"""The data of a run: the task, where it is read from, the training split and how prompts are
tokenised and scored.

One section of ``training.TrainConfig`` (``cfg.data``); its fields keep their flat names as
command-line options and config-file keys (``--task``, ``--max-length``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from blob_lora.tasks.scoring import Scoring
from blob_lora.utils.settings import check_bool, check_int, check_str


@dataclass
class DataConfig:
    """The task and its training inputs (the evaluation split is ``EvalConfig``'s)."""

    KEY_PREFIX: ClassVar[str] = ""

    task: str = "winogrande_s"
    data_root: str | None = None
    train_split: str | None = None
    max_length: int = 300
    scoring: str = "letter"
    length_norm: str = "none"
    bucket_by_length: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a bad value, naming its option (``Scoring`` names --scoring/--length-norm)."""
        check_str(self, "task")
        for name in ("data_root", "train_split", "cache_dir"):
            check_str(self, name, optional=True)
        check_bool(self, "bucket_by_length")
        check_int(self, "max_length", lo=16)
        self.scoring_spec  # noqa: B018 (refuses a bad --scoring / --length-norm)

    @property
    def scoring_spec(self) -> Scoring:
        """How option scores are read (letter or cloze), for datasets and evaluation."""
        return Scoring(self.scoring, self.length_norm)
