"""The resume journal of an interrupted compression (``.zipmoe-partial/`` inside the store directory).

It holds the run's manifest (checkpoint fingerprint, codec settings, store id) and one record per finished
piece (a layer's data file, the dense weights). The index, written last, is what marks a store complete;
the journal only lets the next run with the same manifest skip what is already on disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import msgpack

from .durable import write_atomic
from .format import PARTIAL_DIR

__all__ = ["Journal"]


class Journal:
    """The ``.zipmoe-partial`` directory of ``store``: a manifest plus one record per finished piece."""

    def __init__(self, store: Path):
        self.dir = store / PARTIAL_DIR

    def manifest(self) -> dict | None:
        return self.load("manifest")

    def begin(self, manifest: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.record("manifest", manifest)

    def record(self, name: str, value) -> None:
        write_atomic(self.dir / f"{name}.msgpack", msgpack.packb(value, use_bin_type=True))

    def load(self, name: str):
        """A record, or None when it is missing or unreadable (then the piece is redone)."""
        try:
            return msgpack.unpackb((self.dir / f"{name}.msgpack").read_bytes(), raw=False)
        except (OSError, ValueError, msgpack.UnpackException):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
