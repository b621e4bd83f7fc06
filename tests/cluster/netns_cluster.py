"""A real multi-node Ray cluster on one machine: each node in its own network namespace (a test host).

Ray refuses several nodes on plain loopback, so every node gets a namespace with a veth pair onto one
bridge and an address of its own (DESIGN.md section 4). Nodes are started with ``ray start --block`` as a
user would, each with a custom resource (``edge0``, ``edge1``, ...), in its own process group; ``stop()``
ends those groups (TERM, then KILL) and deletes the namespaces and the bridge: nothing outside what this
object created is touched. Needs root (``ip netns``); ``unavailable()`` says why not when it cannot run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why a namespaced cluster cannot be built here (None when it can)."""
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"zq{os.getpid() % 100000}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class NetnsCluster:
    def __init__(self, nodes: int = 2, cpus: int = 1, port: int = 6390):
        self.n = nodes
        self.cpus = cpus
        self.port = port
        tag = os.getpid() % 100000
        self.prefix = f"zt{tag}"
        self.bridge = f"{self.prefix}-br"
        self.subnet = f"10.232.{tag % 250}"
        self.tmp = Path(tempfile.mkdtemp(prefix="zipmoe-netns-"))
        self.groups: dict[int, int] = {}  # node index -> process group id
        self.namespaces: list[str] = []
        self.logs: dict[int, Path] = {}
        self._bridge_made = False

    # -- addresses ---------------------------------------------------------------------------------------
    def ns(self, i: int) -> str:
        return f"{self.prefix}-{i}"

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @property
    def address(self) -> str:
        return f"{self.ip(0)}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # "0" would refuse a multi-node cluster
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        return env

    def exec_cmd(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside node ``i``'s namespace (the driver runs in node 0's, the head)."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    # -- lifetime ------------------------------------------------------------------------------------------
    def start(self) -> NetnsCluster:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._bridge_made = True
            _ip("link", "set", self.bridge, "up")
            for i in range(self.n):
                ns, host, peer = self.ns(i), f"{self.prefix}-{i}h", f"{self.prefix}-{i}n"
                _ip("netns", "add", ns)
                self.namespaces.append(ns)
                _ip("link", "add", host, "type", "veth", "peer", "name", peer)
                _ip("link", "set", peer, "netns", ns)
                _ip("link", "set", host, "master", self.bridge)
                _ip("link", "set", host, "up")
                _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", peer)
                _ip("-n", ns, "link", "set", peer, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
            for i in range(self.n):
                self._start_node(i)
            self.wait_nodes(self.n)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, i: int) -> None:
        common = ["--block", "--node-ip-address", self.ip(i), "--num-cpus", str(self.cpus)]
        common += ["--resources", f'{{"edge{i}": 1}}', "--temp-dir", str(self.tmp / f"ray-{i}")]
        if i == 0:
            argv = [RAY, "start", "--head", "--port", str(self.port), "--include-dashboard=false", *common]
        else:
            argv = [RAY, "start", "--address", self.address, *common]
        log = self.tmp / f"node{i}.log"
        self.logs[i] = log
        with open(log, "wb") as f:
            p = subprocess.Popen(
                self.exec_cmd(i, argv),
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        self.groups[i] = p.pid  # start_new_session: the group id is the leader's pid
        self._wait_log(i, "Ray runtime started", 60)

    def _wait_log(self, i: int, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs[i].read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray node {i} did not start: {self.logs[i].read_text(errors='replace')[-2000:]}")

    def wait_nodes(self, count: int, timeout: float = 60) -> None:
        """Block until the cluster reports ``count`` alive nodes."""
        probe = (
            "import ray, time, sys\n"
            f"ray.init(address='{self.address}', log_to_driver=False)\n"
            f"deadline = time.time() + {timeout}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.time() < deadline: time.sleep(0.5)\n"
            f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)\n"
        )
        r = subprocess.run(
            self.exec_cmd(0, [sys.executable, "-c", probe]),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"the cluster did not reach {count} nodes: {r.stderr[-2000:]}")

    def node_processes(self, i: int) -> list[int]:
        """Pids of node ``i``: its process group and every descendant (see group_processes)."""
        pg = self.groups.get(i)
        return [] if pg is None else group_processes(pg)

    def kill_node(self, i: int) -> None:
        """Kill node ``i`` outright (its raylet, workers and actors): a device that lost power."""
        pg = self.groups.pop(i, None)
        if pg is not None:
            kill_group(pg)

    def stop(self) -> None:
        # taken before TERM: workers live in sessions of their own and, once the raylet is gone, are no
        # longer its descendants, so the process groups alone would leave surviving actors behind
        pids = [pid for i in list(self.groups) for pid in self.node_processes(i)]
        for pg in list(self.groups.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pg, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_group_alive(pg) for pg in self.groups.values()):
            time.sleep(0.2)
        for pg in self.groups.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pg, signal.SIGKILL)
        for pid in pids:  # whatever TERM left of the workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.groups.clear()
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()
        if self._bridge_made:
            _ip("link", "del", self.bridge, check=False)
            self._bridge_made = False
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> NetnsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pg: int) -> bool:
    try:
        os.killpg(pg, 0)
        return True
    except ProcessLookupError:
        return False


def group_processes(pg: int) -> list[int]:
    """Pids of process group ``pg`` and every descendant (a raylet starts its workers in sessions of their
    own, so the group alone misses the actors)."""
    parent: dict[int, int] = {}
    group: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(d.name)
        parent[pid] = int(fields[1])
        if int(fields[2]) == pg:
            group.add(pid)
    out, frontier = set(group), list(group)
    while frontier:
        p = frontier.pop()
        for child, pp in parent.items():
            if pp == p and child not in out:
                out.add(child)
                frontier.append(child)
    return sorted(out)


def kill_group(pg: int) -> None:
    """SIGKILL process group ``pg`` and every descendant: a node that lost power."""
    pids = group_processes(pg)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pg, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
