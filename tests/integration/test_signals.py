"""SIGTERM and Ctrl-C end a command promptly at any stage: while ray.init waits on an address that never
answers (where ray.init alone ignores SIGTERM for minutes), during a generation on either backend, and
during start-up. Each command runs as a real process; the bound asserted is generous (liveness, not speed:
the command has GRACE_S to unwind, then is ended outright)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.slow

BOUND_S = 90  # a process still running this long after the signal has ignored it


def _zipmoe(*argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "zipmoe_ray.cli.main", *map(str, argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _ended(p: subprocess.Popen, sig: int) -> tuple[int, str]:
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"still running {BOUND_S} s after signal {sig}")
    return p.returncode, err


def _wait_for(p: subprocess.Popen, text: str, timeout: float = 300) -> None:
    """Read stderr until ``text`` appears (the command reached the stage to interrupt)."""
    deadline = time.monotonic() + timeout
    seen = []
    box = {}

    def reader():
        for line in p.stderr:
            seen.append(line)
            if text in line:
                box["hit"] = True
                return

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    th.join(max(0, deadline - time.monotonic()))
    assert box.get("hit"), f"never saw {text!r}: {''.join(seen)[-2000:]}"


def test_sigterm_while_joining_an_address_that_never_answers(tiny_stores):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(300)
    port = server.getsockname()[1]
    p = _zipmoe("generate", tiny_stores["qwen2_moe"], "--prompt", "hi", "--address", f"127.0.0.1:{port}",
                "--connect-timeout", 600)  # fmt: skip
    try:
        conns = [server.accept()[0], server.accept()[0]]  # the probe, then ray.init itself
        time.sleep(2)
        rc, err = _ended(p, signal.SIGTERM)
    finally:
        server.close()
    assert rc == 143 and "terminated" in err and "Traceback" not in err, err
    for c in conns:
        c.close()


@pytest.mark.parametrize("backend, sig, rc", [("local", signal.SIGTERM, 143), ("ray", signal.SIGINT, 130)])
def test_a_signal_during_generation_ends_the_command(tiny_stores, backend, sig, rc):
    # a slow emulated SSD keeps the generation running long enough
    p = _zipmoe("-v", "generate", tiny_stores["qwen2_moe"], "--prompt-ids", "1,2,3", "--max-new-tokens", 250,
                "--backend", backend, "--no-calibrate", "--memory-budget", "10%", "--ssd-bandwidth", "0.2MB")  # fmt: skip
    _wait_for(p, "cache plan")  # then the model loads (seconds) and the generation runs (minutes)
    time.sleep(8)
    got, err = _ended(p, sig)
    assert got == rc and "Traceback" not in err, err


def test_sigterm_during_start_up_ends_the_command(tiny_stores):
    p = _zipmoe("generate", tiny_stores["qwen2_moe"], "--prompt", "hi", "--backend", "ray")
    time.sleep(8)  # importing, starting Ray or loading the model: whichever it is, it must end
    got, err = _ended(p, signal.SIGTERM)
    assert got in (143, -signal.SIGTERM, 0), (got, err)  # 0: it had already finished
    assert "Traceback" not in err, err
