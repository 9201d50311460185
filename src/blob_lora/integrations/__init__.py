"""BLoB in other training frameworks: ``BlobTrainer`` for the Hugging Face ``Trainer``."""

from blob_lora.integrations.hf_trainer import BlobPaperAdamW, BlobTrainer

__all__ = ["BlobPaperAdamW", "BlobTrainer"]
