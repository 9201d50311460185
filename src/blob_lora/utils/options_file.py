"""One settings file beside a saved adapter: the dict form, the atomic save and the checked load
shared by the tuners' options classes (``BlobConfig``, ``BayesianLoraConfig``, ``AbmllConfig``).

Each tuner keeps its own settings in ``<name>_config.json`` next to PEFT's
``adapter_config.json`` so plain PEFT still reads the folder. Written once here, the three
classes refuse the same faults with the same words: an unknown field (a file from a newer
version, a typo) is a ``ConfigError`` naming the class and the known fields; a saved file that
is missing, corrupt, not an object, or holds such a field or an invalid value is a
``CheckpointError`` naming the file, so a user learns which folder is wrong and why instead of
seeing a bare ``KeyError`` or ``JSONDecodeError``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import CheckpointError, ConfigError
from blob_lora.utils.json_file import read_json_object

T = TypeVar("T", bound="OptionsFile")


class OptionsFile:
    """Mixin for a settings dataclass stored as ``FILE_NAME`` in an adapter folder.

    A subclass sets ``LABEL`` (the class name errors use) and names its file and what a folder
    without it is (completing ``"<path> not found: <folder> ..."``) as class keywords::

        class BlobConfig(OptionsFile, file_name="blob_config.json", missing_hint="is not ...")
    """

    LABEL: ClassVar[str]
    FILE_NAME: ClassVar[str]
    MISSING_HINT: ClassVar[str]

    def __init_subclass__(cls, *, file_name: str, missing_hint: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.FILE_NAME = file_name
        cls.MISSING_HINT = missing_hint

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (the file's content)."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """The settings of ``data``; unknown keys are refused rather than silently dropped."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown {cls.LABEL or cls.__name__} fields {sorted(unknown)}; "
                f"known: {sorted(known)}"
            )
        return cls(**data)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``FILE_NAME`` into ``directory`` atomically; returns its path."""
        return atomic_write_json(Path(directory) / self.FILE_NAME, self.to_dict())

    @classmethod
    def load(cls: type[T], directory: str | os.PathLike[str]) -> T:
        """Read ``FILE_NAME`` from ``directory``; ``CheckpointError`` naming the file when it is
        missing, unreadable, not a JSON object, or holds an unknown field or invalid value."""
        path = Path(directory) / cls.FILE_NAME
        if not path.is_file():
            raise CheckpointError(f"{path} not found: {directory} {cls.MISSING_HINT}")
        data = read_json_object(path, CheckpointError)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:  # a saved file that no version wrote: a damaged checkpoint
            raise CheckpointError(f"{path} holds invalid settings: {exc}") from exc
