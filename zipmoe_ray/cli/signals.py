"""SIGTERM and Ctrl-C end every command promptly, wherever it is.

A Python signal handler runs only when the main thread next executes Python code, and a command's main
thread can sit in C for minutes (``ray.init`` retrying an address, a wait inside Ray or torch). So besides
the handler, which raises :class:`Interrupted` in the main thread so that the command unwinds (its engine
stops, temporary files go), the C-level handler's wakeup file descriptor wakes a watcher thread at once:
if the command has not ended ``GRACE_S`` seconds after the signal, or a second signal comes, the watcher
ends the process (``os._exit``; processes Ray started for it share its fate).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading

__all__ = ["GRACE_S", "Interrupted", "SignalGuard", "install_signal_handlers"]

GRACE_S = 10.0  # seconds a command has to unwind after SIGTERM or Ctrl-C before it is ended outright
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGINT."""

    SIGTERM = signal.SIGTERM
    SIGINT = signal.SIGINT


class SignalGuard:
    """Installed for the duration of one command (main thread only)."""

    def __init__(self, grace_s: float = GRACE_S):
        self.grace_s = grace_s
        self.received: int | None = None
        self._seen = threading.Event()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._old = {s: signal.getsignal(s) for s in _SIGNALS}
        for s in _SIGNALS:
            signal.signal(s, self._handler)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="zipmoe-signals", daemon=True)
        self._thread.start()

    def _note(self, signum: int) -> None:
        if self.received is None:
            self.received = signum
        self._seen.set()

    def _handler(self, signum, frame) -> None:
        self._note(signum)
        raise Interrupted(signum)

    def wait_received(self, timeout: float) -> int | None:
        """The signal received, waiting up to ``timeout`` for the watcher to see one (a handler installed
        by someone else, e.g. Ray's, may have turned it into SystemExit before ours ran)."""
        self._seen.wait(timeout)
        return self.received

    def _watch(self) -> None:
        deadline = None
        count = 0
        while not self._stop.is_set():
            timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - _now()))
            ready, _, _ = select.select([self._r], [], [], timeout)
            if ready:
                try:
                    data = self._r.recv(64)
                except (BlockingIOError, OSError):
                    data = b""
                for b in data:
                    if b in _SIGNALS:
                        self._note(b)
                        count += 1
                        if deadline is None:
                            deadline = _now() + self.grace_s
            if self._stop.is_set():
                return
            if deadline is not None and (count > 1 or _now() >= deadline):
                sig = self.received or signal.SIGTERM
                why = "a second signal" if count > 1 else f"{self.grace_s:g} s after the signal"
                with contextlib.suppress(Exception):
                    print(f"zipmoe: still running {why}; ending now", file=sys.stderr, flush=True)
                os._exit(128 + int(sig))

    def uninstall(self) -> None:
        self._stop.set()
        with contextlib.suppress(ValueError):  # not the main thread any more: nothing was installed here
            signal.set_wakeup_fd(self._old_fd)
            for s, h in self._old.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._thread.join(timeout=2)
        self._r.close()
        self._w.close()


def _now() -> float:
    import time

    return time.monotonic()


def install_signal_handlers(grace_s: float = GRACE_S) -> SignalGuard | None:
    """A SignalGuard for this command; None outside the main thread (signals cannot be handled there)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return SignalGuard(grace_s)
