"""What a system's child process reads of its own cgroup, just before and just after the measured generation:
the bytes read from the disk (the throttle's counter) and, at the end, the memory charged to it by kind. Two
file reads each time; nothing runs in between."""

from __future__ import annotations

from pathlib import Path

# memory.stat keys: (v1, v2) -> what the output calls them
_KINDS = {
    "anon": ("total_rss", "anon"),
    "page_cache": ("total_cache", "file"),
    "mapped_file": ("total_mapped_file", "file_mapped"),
    "shmem": ("total_shmem", "shmem"),
}


class Probe:
    """``probe()`` -> bytes read so far (None without a throttle); each call also keeps the memory charged
    to the cgroup by kind in :attr:`memory` (None without a memory cgroup). ``spec``: SystemCgroup.spec()."""

    def __init__(self, spec: dict | None):
        self.spec = spec or {}
        self.memory: dict | None = None

    def __call__(self) -> int | None:
        from storage import MemoryCgroup, Throttle

        mem = self.spec.get("memory")
        if mem:
            stat = MemoryCgroup(Path(mem["path"]), mem["version"]).stat()
            col = 0 if mem["version"] == 1 else 1
            self.memory = {k: stat.get(names[col]) for k, names in _KINDS.items()}
        io = self.spec.get("io")
        if not io:
            return None
        return Throttle(Path(io["path"]), io["version"], io["device"]).bytes_read()
