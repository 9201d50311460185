"""PEFT tuner extensions; ``blob`` is the Bayesian LoRA tuner."""
