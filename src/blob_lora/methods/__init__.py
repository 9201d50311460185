"""Fine-tuning methods as strategies of one harness: BLoB and the paper's baselines.

``base.Method`` declares the hooks (model, loss, prediction); ``lora``, ``map``,
``mc_dropout`` and ``blob`` are trained by the loop, ``composite.CompositeMethod`` subclasses
(``ensemble``, ``laplace_method``, ``tfb``) as sub-runs plus an assembly step; ``registry``
finds them by name.
"""

from blob_lora.methods.base import Method
from blob_lora.methods.registry import METHODS, get_method, method_of

__all__ = ["METHODS", "Method", "get_method", "method_of"]
