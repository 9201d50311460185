"""The tool's own exception types, so the CLI can print them without a traceback."""

from __future__ import annotations


class BlobLoraError(Exception):
    """Base class for errors caused by user input or environment, shown to users as-is."""


class DataError(BlobLoraError, ValueError):
    """A dataset file or record is missing or malformed."""


class ConfigError(BlobLoraError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class CheckpointError(BlobLoraError):
    """A checkpoint or adapter folder is missing, corrupt or does not fit the model."""
