"""Evaluation of one task: the averaged predictive over a split, metrics, per-example files,
plots (``evaluate``), and the held-out learning curve scored during training (``curve``)."""
