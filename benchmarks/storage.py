"""An emulated edge SSD that every benchmarked system reads through: a cgroup read-bandwidth cap.

Our engine can cap its own reads (``ZipMoEEngine(bandwidth=...)``), but Accelerate's disk offload
memory-maps files and faults pages in, which no user-space limiter sees. So the storage itself is throttled:
each system runs in a child process placed in a fresh cgroup whose block-I/O controller caps reads from the
disk that holds the files (cgroup v1 ``blkio.throttle.read_bps_device``, or v2 ``io.max rbps``). Page faults,
``O_DIRECT`` reads and buffered reads are all throttled alike, for every process the child starts (Ray's
raylet, workers and object store included), and the cgroup's own counters give the bytes really read.

Needs root and a cgroup block-I/O controller; :func:`open_throttle` returns None (with the reason) where
either is missing, and the benchmark then falls back to the engine's own limiter and unthrottled Accelerate,
and says so in its output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup/blkio")
V2 = Path("/sys/fs/cgroup")


def disk_of(path: str | os.PathLike) -> str:
    """``MAJ:MIN`` of the whole disk holding ``path`` (throttle rules apply to disks, not partitions)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sysdev = Path("/sys/dev/block") / dev
    if not sysdev.exists():
        raise RuntimeError(
            f"{path} is on device {dev}, not a block device (overlay or tmpfs?): the emulated SSD throttles a "
            "disk; put the benchmark cache (ZIPMOE_BENCH_CACHE or ~/.cache/zipmoe/bench) on one"
        )
    if (sysdev / "partition").is_file():
        dev = (sysdev.resolve().parent / "dev").read_text().strip()
    return dev


class Throttle:
    """A cgroup capping reads from one disk; children join it with :meth:`join` (a ``preexec_fn``)."""

    def __init__(self, path: Path, version: int, device: str):
        self.path, self.version, self.device = path, version, device

    def set_bandwidth(self, bps: float) -> None:
        if self.version == 1:
            (self.path / "blkio.throttle.read_bps_device").write_text(f"{self.device} {int(bps)}\n")
        else:
            (self.path / "io.max").write_text(f"{self.device} rbps={int(bps)}\n")

    def join(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def bytes_read(self) -> int:
        """Bytes read from the disk by the cgroup's processes so far."""
        if self.version == 1:
            for line in (self.path / "blkio.throttle.io_service_bytes").read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == self.device and parts[1] == "Read":
                    return int(parts[2])
            return 0
        for line in (self.path / "io.stat").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == self.device:
                for kv in parts[1:]:
                    if kv.startswith("rbytes="):
                        return int(kv[7:])
        return 0

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def kill_all(self) -> None:
        """Kill what is left in the cgroup: only processes this benchmark started can be in it."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while self.pids() and time.time() < deadline:
            time.sleep(0.1)

    def remove(self) -> None:
        self.kill_all()
        with contextlib.suppress(OSError):
            self.path.rmdir()


def open_throttle(path: str | os.PathLike, name: str) -> tuple[Throttle | None, str]:
    """A new cgroup throttling the disk under ``path``; (None, why) where that is impossible."""
    if os.geteuid() != 0:
        return None, "not root: cannot create a cgroup"
    device = disk_of(path)
    if (V1 / "blkio.throttle.read_bps_device").is_file():
        cg, version = V1 / name, 1
    elif (V2 / "cgroup.controllers").is_file() and "io" in (V2 / "cgroup.controllers").read_text().split():
        with contextlib.suppress(OSError):
            (V2 / "cgroup.subtree_control").write_text("+io")
        cg, version = V2 / name, 2
    else:
        return None, "no cgroup block-I/O controller (blkio or io) on this machine"
    try:
        cg.mkdir(exist_ok=True)
        t = Throttle(cg, version, device)
        t.set_bandwidth(1 << 40)
    except OSError as e:
        with contextlib.suppress(OSError):
            cg.rmdir()
        return None, f"cannot set up a throttled cgroup on disk {device}: {e}"
    return t, ""
