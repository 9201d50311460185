"""A run from settings to summary.json: pick the method, train, evaluate, write the summary.

* ``run``: :func:`train`, the entry point; a composite method goes to ``composite``, any other
  to ``plain``.
* ``plain``: the training loop (``blob_lora.training``), then evaluation, then summary.json.
* ``composite``: a composite method's sub-runs and assembly (``blob_lora.methods.composite``).
* ``evaluate``: a run scored on its own task and ``--eval-tasks``, the same way for both.
"""

from blob_lora.pipeline.run import train

__all__ = ["train"]
