"""A fork server for the kill -9 loop: imports zipmoe once, then runs each `zipmoe` command it is sent in a
forked child that SIGKILLs itself at its Nth filesystem operation (mkdir, fsync, rename, replace, unlink,
rmdir, chmod, copy) counted from the moment the store directory exists: kill points at every step of a
compression, spread over the whole run, without timing. Not a test module (no ``test_`` prefix).

Protocol: one JSON line in (``{"argv": [...], "kill_at": N or null, "watch": [paths], "log": path}``), one
JSON line out (``{"status": exit status or -signal, "events": operations counted}``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

from zipmoe_ray.cli.main import main

OPS = [(os, n) for n in ("mkdir", "fsync", "rename", "replace", "unlink", "rmdir", "chmod")] + [
    (shutil, "copyfile")
]


def _child(argv: list[str], kill_at: int | None, watch: list[str], log: str, count_file: str) -> None:
    count = {"n": 0}

    def wrap(mod, name):
        real = getattr(mod, name)

        def op(*a, **kw):
            if any(os.path.exists(p) for p in watch):
                count["n"] += 1
                if kill_at is not None and count["n"] >= kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)

        setattr(mod, name, op)

    for mod, name in OPS:
        wrap(mod, name)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 99
    sys.stdout.flush()
    sys.stderr.flush()
    with open(count_file, "w") as f:
        f.write(str(count["n"]))
    os._exit(rc)


def serve() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        count_file = req["log"] + ".count"
        if os.path.exists(count_file):
            os.remove(count_file)
        pid = os.fork()
        if pid == 0:
            _child(req["argv"], req["kill_at"], req["watch"], req["log"], count_file)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        events = None
        if os.path.exists(count_file):
            with open(count_file) as f:
                events = int(f.read())
        print(json.dumps({"status": code, "events": events}), flush=True)


if __name__ == "__main__":
    serve()
