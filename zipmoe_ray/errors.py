"""The one exception hierarchy of zipmoe-ray.

Every error a user can cause derives from :class:`ZipMoEError`; messages say what was wrong and what to
change. All classes are plain ``Exception`` subclasses whose state is the message (plus, for an error that
ended a generation midway, what was generated until then: :attr:`ZipMoEError.partial`), so they pickle
across Ray actors unchanged.
"""

from __future__ import annotations

__all__ = [
    "ArchitectureError",
    "BudgetError",
    "CheckpointError",
    "ChecksumError",
    "ClusterError",
    "ConfigError",
    "DTypeError",
    "FormatVersionError",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "ZipMoEError",
]


class ZipMoEError(Exception):
    """Base class of every error zipmoe-ray raises on purpose.

    An error that ends a generation after tokens were produced (a damaged expert found at decode step 11)
    carries them: ``partial`` is the GenerationOutput (one prompt) or the list of them (a batch) that
    ``generate`` or ``stream`` had produced, ``partial_token_ids`` the generated ids per prompt. Both are
    ``None`` for every other error.
    """

    partial = None
    partial_token_ids: list[list[int]] | None = None


class ConfigError(ZipMoEError, ValueError):
    """A configuration field or command-line value is invalid."""


class DTypeError(ZipMoEError, TypeError):
    """A tensor's dtype cannot be compressed losslessly by the codec (only floating-point dtypes can)."""


class CheckpointError(ZipMoEError):
    """The model directory is missing, is not a Hugging Face safetensors checkpoint, or holds bad tensors."""


class ArchitectureError(CheckpointError):
    """The checkpoint's architecture is not one zipmoe-ray supports."""


class StoreError(ZipMoEError):
    """A store directory cannot be used (missing, incomplete, another format version, ...)."""


class FormatVersionError(StoreError):
    """The store was written in a format version this zipmoe-ray cannot read."""


class StoreCorruptError(StoreError):
    """Bytes of the store are damaged: a truncated file, a bad header or a failed checksum."""


class ChecksumError(StoreCorruptError):
    """A chunk's checksum does not match: its bytes are never decoded or computed with."""


class StoreMismatchError(StoreError):
    """The store does not belong to the checkpoint (or data file) it is used with."""


class ClusterError(ZipMoEError):
    """The Ray cluster given by ``--address`` cannot be reached or joined in time."""


class BudgetError(ConfigError):
    """A memory budget is too small or malformed."""
