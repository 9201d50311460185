"""The ``blob-lora`` command line."""
