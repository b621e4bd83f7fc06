"""The CLI's progress bar (library code reports progress through the Progress protocol; only the CLI draws)."""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["TqdmProgress"]


class TqdmProgress:
    """Bytes with MB/s, plus tensors done (or any ``unit``, counted plainly), on stderr; hidden when stderr
    is not a terminal or ``quiet``."""

    def __init__(self, desc: str, quiet: bool = False, unit: str = "B"):
        self.desc = desc
        self.quiet = quiet
        self.unit = unit
        self.bar: tqdm | None = None
        self.tensors = 0
        self.total_tensors = 0

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self.total_tensors = total_tensors
        self.bar = tqdm(
            total=total_bytes,
            desc=self.desc,
            unit=self.unit,
            unit_scale=self.unit == "B",
            unit_divisor=1000,
            file=sys.stderr,
            disable=True if self.quiet else None,
            dynamic_ncols=True,
        )

    def advance(self, nbytes: int, ntensors: int) -> None:
        if self.bar is None:
            return
        self.tensors += ntensors
        if self.total_tensors:
            self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
        self.bar.update(nbytes)

    def note(self, message: str) -> None:
        """A line about the work (what a resume kept), printed even with ``quiet``."""
        if self.bar is not None and not self.bar.disable:
            self.bar.write(f"{self.desc}: {message}", file=sys.stderr)
        else:
            print(f"{self.desc}: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
