"""Old home of the core forward, now ``blob_lora.models.forward``; only re-exports it.

Kept because ``bench/scoring.py`` still imports this path; drop it once that script imports
``blob_lora.models.forward``.
"""

from blob_lora.models.forward import answer_logits, cloze_logits, repeat_batch

__all__ = ["answer_logits", "cloze_logits", "repeat_batch"]
