"""Run one independent, CPU-bound computation in a forked child while the caller goes on (the simulator's
lower bounds beside its replay): the machine's second core does it, the result is the same.

``start(fn)`` forks where the platform can (POSIX ``fork``), else runs ``fn`` at once; ``Pending.result()``
blocks until the child sends its value back and re-raises what it raised. A child that dies without an
answer (killed, out of memory) is not waited for again: ``fn`` is then run in the caller, so a result is
always produced, never a hang.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable
from typing import Any

__all__ = ["Pending", "start"]

log = logging.getLogger(__name__)


class Pending:
    """A value being computed by ``fn`` (in a child process, or already computed here)."""

    def __init__(self, fn: Callable[[], Any], fork: bool):
        self._fn = fn
        self._proc = self._conn = None
        self._done = False
        self._value: Any = None
        if fork:
            try:
                ctx = mp.get_context("fork")
                self._conn, child = ctx.Pipe(duplex=False)
                self._proc = ctx.Process(target=_child, args=(fn, child), daemon=True)
                self._proc.start()
                child.close()
                return
            except (OSError, ValueError) as e:  # no fork here, or no resources for one: compute inline
                log.debug("background computation runs inline: %s", e)
                self._proc = self._conn = None
        self._value, self._done = fn(), True

    def result(self) -> Any:
        """The value (blocks until the child has sent it); re-raises the child's exception."""
        if self._done:
            return self._value
        try:
            ok, value = self._conn.recv()
        except (EOFError, OSError):  # the child died without an answer: do it here
            log.warning("background computation lost its process; computing it in the foreground")
            ok, value = True, self._fn()
        finally:
            self._conn.close()
            self._proc.join(timeout=5)
        self._done, self._value = True, value
        if not ok:
            raise value
        return value


def _child(fn, conn) -> None:
    try:
        out = (True, fn())
    except BaseException as e:  # handed to the parent, which re-raises it
        out = (False, e)
    try:
        conn.send(out)
    finally:
        conn.close()


def start(fn: Callable[[], Any], *, fork: bool = True) -> Pending:
    """Start computing ``fn()``: in a forked child when ``fork`` (and the platform allows), else now."""
    return Pending(fn, fork and "fork" in mp.get_all_start_methods())
