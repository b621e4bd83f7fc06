"""The parent side of bench_e2e: each system in its own child process, in its own cgroup, measured without
being disturbed.

Per system run: a fresh cgroup (storage.SystemCgroup) with the emulated SSD's read cap and, for llama.cpp,
a memory cap; the page cache of the files the system will read is dropped first, so that it reads them
through the throttle and is charged for them whatever ran before; after it: the kernel's peak of the memory
charged to the cgroup, read once. Nothing samples the system while it runs. Where no cgroup can be made (not
root), peak memory falls back to the larger of the child's own peak RSS (the kernel's, from ``wait4``) and
the summed PSS of its process tree sampled every :data:`SAMPLE_EVERY_S` seconds, a sampler whose CPU time is
measured and reported (``memory_sampler_cpu_share``), so that its cost is shown rather than assumed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SAMPLE_EVERY_S = 30.0  # the fallback sampler's period: one sample costs ~5-20 ms of CPU on a Ray tree
_seq = itertools.count()


class TreeSampler(threading.Thread):
    """The fallback: peak of the summed PSS over a process tree, sampled every ``interval`` seconds, and the
    sampler's own CPU time (``cpu_s``; this thread's, which includes the kernel's work reading smaps)."""

    def __init__(self, pid: int, interval: float = SAMPLE_EVERY_S):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak, self.cpu_s, self.samples = 0, 0.0, 0
        self._halt = threading.Event()

    def sample(self) -> int:
        """One reading: the summed PSS of ``pid`` and its descendants, in bytes. Blocks for its duration."""
        import psutil

        total = 0
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        for p in procs:
            with contextlib.suppress(psutil.Error, OSError):
                total += p.memory_full_info().pss
        return total

    def run(self):
        while not self._halt.wait(self.interval):
            c0 = time.thread_time()
            self.peak = max(self.peak, self.sample())
            self.cpu_s += time.thread_time() - c0
            self.samples += 1

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def memory_method(cgroup) -> str:
    """How peak memory is measured in this run, in words, for the output."""
    if cgroup is not None and cgroup.memory is not None:
        counter = "memory.max_usage_in_bytes" if cgroup.memory.version == 1 else "memory.peak"
        return (
            f"cgroup v{cgroup.memory.version} {counter} of a fresh cgroup per system, read once when it is "
            "done (no sampling): anonymous memory, shared memory (Ray's object store) and the page cache of "
            "the files it read or mapped, load included; those files are dropped from the page cache before "
            "each system starts, so each is charged for its own"
        )
    return (
        "no memory cgroup (needs root): the larger of the child's own peak RSS (kernel, wait4) and the summed "
        f"PSS of its process tree sampled every {SAMPLE_EVERY_S:g} s (sampler CPU share reported per system)"
    )


def _reap(proc: subprocess.Popen, timeout: float, log, name: str) -> tuple[str, int, int]:
    """Read the child's stdout and wait for it with ``wait4`` (its kernel peak RSS comes with it); kill its
    process group after ``timeout`` seconds. Returns (stdout, exit code, peak RSS bytes)."""
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(zip(("pid", "status", "ru"), os.wait4(proc.pid, 0))))
    waiter.start()
    waiter.join(timeout)
    if waiter.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log(f"  {name} timed out after {timeout:.0f}s")
        waiter.join()
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(got["status"])  # reaped here: Popen must not wait again
    return (out[0] if out else ""), proc.returncode, got["ru"].ru_maxrss * 1024


def run_child(
    spec: dict,
    *,
    cache: Path,
    bandwidth_bps: float | None,
    memory_limit: int | None = None,
    drop: list[str] = (),
    log=print,
    timeout: float = 1800,
) -> dict:
    """Run ``spec`` in a child process (``bench_e2e.py --child``) inside a fresh cgroup under the read cap
    ``bandwidth_bps`` (None: none) and the memory cap ``memory_limit`` (None: none), after dropping the page
    cache of ``drop``. Blocks; returns the child's JSON result plus ``peak_memory_bytes`` (and the cap's
    figures when capped), or ``{"error": ...}``. The cgroup and everything left in it are removed."""
    from storage import drop_page_cache, open_system_cgroup

    cg, _ = open_system_cgroup(cache, f"zipmoe-bench-{os.getpid()}-{next(_seq)}")
    try:
        if memory_limit is not None and (cg is None or cg.memory is None):
            return {"error": "a memory cap needs a memory cgroup (run as root)"}
        if cg and cg.io:
            cg.io.set_bandwidth(bandwidth_bps or (1 << 40))
        if cg and cg.memory:
            cg.memory.set_limit(memory_limit)
        drop_page_cache(drop)
        spec = {**spec, "cgroup": cg.spec() if cg else None}
        bench = Path(__file__).resolve().parents[1]
        cmd = [sys.executable, str(bench / "bench_e2e.py"), "--child", json.dumps(spec)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(bench), str(bench.parent)]))
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
            preexec_fn=cg.join if cg else None,
        )  # fmt: skip
        sampler = None if (cg and cg.memory) else TreeSampler(proc.pid)
        if sampler:
            sampler.start()
        try:
            out, code, maxrss = _reap(proc, timeout, log, spec["system"])
        finally:
            sampled = sampler.stop() if sampler else None
            if cg:
                for pid in cg.pids():  # anything the child left behind (Ray's processes are in its cgroup)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        wall = time.perf_counter() - t0
        mem: dict = {}
        if cg and cg.memory:
            mem["peak_memory_bytes"] = cg.memory.peak()
            if memory_limit is not None:
                mem.update(memory_limit_bytes=memory_limit, memory_limit_hits=cg.memory.limit_hits())
        else:
            mem["peak_memory_bytes"] = max(maxrss, sampled or 0)
            mem["memory_sampler_cpu_share"] = sampler.cpu_s / wall if wall else 0.0
        if code != 0:
            return {"error": f"exit status {code}", **mem}
        return {**json.loads(out.strip().splitlines()[-1]), **mem}
    finally:
        if cg:
            cg.remove()
