"""An emulated edge SSD that every benchmarked system reads through: a cgroup read-bandwidth cap.

Our engine can cap its own reads (``ZipMoEEngine(bandwidth=...)``), but Accelerate's disk offload
memory-maps files and faults pages in, which no user-space limiter sees. So the storage itself is throttled:
each system runs in a child process placed in a fresh cgroup whose block-I/O controller caps reads from the
disk that holds the files (cgroup v1 ``blkio.throttle.read_bps_device``, or v2 ``io.max rbps``). Page faults,
``O_DIRECT`` reads and buffered reads are all throttled alike, for every process the child starts (Ray's
raylet, workers and object store included), and the cgroup's own counters give the bytes really read.

The same cgroup does the memory accounting (:class:`MemoryCgroup`): the kernel's own peak of everything
charged to it (cgroup v1 ``memory.max_usage_in_bytes``, v2 ``memory.peak``: anonymous memory, shared memory
such as Ray's object store, and the page cache of the files its processes read or mapped), read once when
the system is done, so the measurement costs nothing while it runs; and, for llama.cpp, a cap
(``memory.limit_in_bytes`` / ``memory.max``) under which the kernel evicts its memory-mapped weights and
faults them in again through the throttle. :class:`SystemCgroup` is one fresh cgroup per system run (both
hierarchies on v1), so that each peak is that system's alone.

Needs root and a cgroup block-I/O controller; :func:`open_throttle` returns None (with the reason) where
either is missing, and the benchmark then falls back to the engine's own limiter and unthrottled Accelerate,
and says so in its output. :func:`open_system_cgroup` returns whichever of the two parts it could make.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup/blkio")
V1_MEMORY = Path("/sys/fs/cgroup/memory")
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


class _Cgroup:
    """One cgroup folder: who is in it, joining it, killing what is left in it, removing it."""

    path: Path

    def join(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

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


class Throttle(_Cgroup):
    """A cgroup capping reads from one disk; children join it with :meth:`join` (a ``preexec_fn``)."""

    def __init__(self, path: Path, version: int, device: str):
        self.path, self.version, self.device = path, version, device

    def set_bandwidth(self, bps: float) -> None:
        if self.version == 1:
            (self.path / "blkio.throttle.read_bps_device").write_text(f"{self.device} {int(bps)}\n")
        else:
            (self.path / "io.max").write_text(f"{self.device} rbps={int(bps)}\n")

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


def drop_page_cache(paths) -> None:
    """Drop the clean, unmapped page-cache pages of every file under ``paths`` (files or folders), so that
    the next system to read them reads the disk (through its throttle) and is charged for the pages."""
    for p in paths:
        p = Path(p)
        for f in [p] if p.is_file() else (x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []:
            with contextlib.suppress(OSError):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


class MemoryCgroup(_Cgroup):
    """A memory cgroup: the kernel's peak of what is charged to it, and an optional cap."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    def _read(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def set_limit(self, limit: int | None) -> None:
        """Cap the memory charged to the cgroup (None: no cap). Over it the kernel reclaims page cache
        (memory-mapped weights are faulted in again) and kills the cgroup's processes if that is not enough."""
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text("-1" if limit is None else str(int(limit)))
        else:
            (self.path / "memory.max").write_text("max" if limit is None else str(int(limit)))

    def peak(self) -> int:
        """The most memory charged to the cgroup at any time since it was made (the kernel's counter)."""
        return self._read("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")

    def stat(self) -> dict[str, int]:
        """The cgroup's ``memory.stat`` (bytes and counts by kind, as the kernel names them)."""
        out = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[k] = int(v)
        return out

    def limit_hits(self) -> int:
        """How often the cap was reached (v1 ``memory.failcnt``, v2 ``memory.events`` max)."""
        if self.version == 1:
            return self._read("memory.failcnt")
        for line in (self.path / "memory.events").read_text().splitlines():
            if line.startswith("max "):
                return int(line.split()[1])
        return 0


class SystemCgroup:
    """The cgroup(s) one system runs in: a read throttle (``io``) and memory accounting (``memory``), either
    None where this machine cannot make it. On cgroup v1 the two live in two hierarchies, on v2 in one folder.
    Made per system run by :func:`open_system_cgroup`; :meth:`remove` kills what is left and removes them."""

    def __init__(self, io: Throttle | None, memory: MemoryCgroup | None):
        self.io, self.memory = io, memory

    def join(self) -> None:
        """Move the calling process into the cgroup(s) (a ``preexec_fn``: the child's children follow)."""
        for part in {p.path: p for p in (self.io, self.memory) if p}.values():
            part.join()

    def pids(self) -> list[int]:
        return sorted({pid for p in (self.io, self.memory) if p for pid in p.pids()})

    def spec(self) -> dict:
        """What a child needs to read its own counters (JSON-able; e2e/probe.py reads it)."""
        io, mem = self.io, self.memory
        return {
            "io": io and {"path": str(io.path), "version": io.version, "device": io.device},
            "memory": mem and {"path": str(mem.path), "version": mem.version},
        }

    def remove(self) -> None:
        for part in (self.io, self.memory):
            if part:
                part.kill_all()
        for path in {p.path for p in (self.io, self.memory) if p}:
            with contextlib.suppress(OSError):
                path.rmdir()


def _own_v1_memory_cgroup() -> Path | None:
    """This process's cgroup in the v1 memory hierarchy: new cgroups nest under it, inside its limits."""
    if not (V1_MEMORY / "memory.max_usage_in_bytes").is_file():
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return V1_MEMORY / path.lstrip("/")
    return V1_MEMORY


def open_system_cgroup(path: str | os.PathLike, name: str) -> tuple[SystemCgroup | None, str]:
    """Fresh cgroup(s) named ``name`` for one system: a read throttle on the disk under ``path`` (no cap
    until set) and memory accounting. Returns (None, why) when neither can be made, else the cgroup and why
    a part is missing ("" when none is)."""
    io, why_io = open_throttle(path, name)
    memory, why_mem = None, ""
    if os.geteuid() != 0:
        why_mem = "not root: cannot create a cgroup"
    elif io is not None and io.version == 2:
        with contextlib.suppress(OSError):
            (V2 / "cgroup.subtree_control").write_text("+memory")
        if (io.path / "memory.peak").is_file():
            memory = MemoryCgroup(io.path, 2)
        else:
            why_mem = "no cgroup v2 memory controller with memory.peak (kernel 5.19+)"
    elif (parent := _own_v1_memory_cgroup()) is not None:
        try:
            (parent / name).mkdir(exist_ok=True)
            memory = MemoryCgroup(parent / name, 1)
        except OSError as e:
            why_mem = f"cannot create a v1 memory cgroup under {parent}: {e}"
    else:
        why_mem = "no cgroup memory controller on this machine"
    if io is None and memory is None:
        return None, f"{why_io}; {why_mem}"
    return SystemCgroup(io, memory), "; ".join(w for w in (why_io, why_mem) if w)
