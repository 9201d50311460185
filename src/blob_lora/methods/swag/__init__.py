"""SWAG-LoRA: the posterior (running moments, samples, file), where it lives in a PEFT model,
and the method (``method.SwagMethod``)."""

from blob_lora.methods.swag.config import SwagConfig
from blob_lora.methods.swag.method import SwagMethod
from blob_lora.methods.swag.posterior import POSTERIOR_FILE, Layout, SwagPosterior

__all__ = ["POSTERIOR_FILE", "Layout", "SwagConfig", "SwagMethod", "SwagPosterior"]
