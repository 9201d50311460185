"""Experiment sweeps over methods × tasks × seeds (``blob-lora compare``)."""

from blob_lora.comparison.compare import plan, run_compare
from blob_lora.comparison.spec import CompareSpec, load_spec, spec_from_dict

__all__ = ["CompareSpec", "load_spec", "plan", "run_compare", "spec_from_dict"]
