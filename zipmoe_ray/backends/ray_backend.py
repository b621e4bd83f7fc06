"""The Ray backend: every stage a Ray actor on one node, planes through the object store.

One process on a laptop (an embedded single-node cluster on 127.0.0.1), `ray start` on a Jetson host
(``--address``), or stages the caller started and placed (``ZipMoEEngine(stages=...)``). Several nodes are
the cluster backend's (cluster.py), which shares this connection and these calls.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
from typing import Any

from ..errors import ClusterError, ZipMoEError
from .base import Backend, LaneStats
from .cluster_nodes import NodeInfo, node_entry, pin
from .ray_stages import (
    Stages,
    kill_and_wait,
    start_decompressors,
    start_executor,
    start_loader,
    start_scheduler,
)
from .ray_transport import unwrap

__all__ = ["RayBackend", "connect_ray", "wait"]

log = logging.getLogger(__name__)


def connect_ray(config) -> bool:
    """Attach to the cluster at ``config.address``, or start an embedded one on loopback; True when this
    call started Ray (and the backend must shut it down). Ray already initialised in this process (a Ray
    Serve replica, a test) is used as it is."""
    if "ray" not in sys.modules and not config.address:
        # an embedded single-node cluster: keep every Ray listener on 127.0.0.1 (read at import time)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    if config.address:
        attach(config.address, config.connect_timeout)
        return False
    # address="local": a new instance, always. With no address, ray.init would attach to the cluster named
    # by RAY_ADDRESS or to the last one `ray start` left in /tmp/ray/ray_current_cluster (and then refuse
    # num_cpus), where --address is how a user asks for a cluster
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return True


class _DropThreadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "not the main thread" not in record.getMessage()


def attach(address: str, timeout: float) -> None:
    """``ray.init(address=address)`` within ``timeout`` seconds, or ClusterError naming the address.

    ``ray.init`` retries a dead address for minutes and cannot be interrupted meanwhile, so the address is
    first probed with a plain TCP connection (nothing listening: refused at once), then joined on a
    helper thread that is abandoned at the deadline (a join that completes after that is undone)."""
    import ray

    from ..runtime.config import parse_address

    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)):
            pass
    except socket.gaierror as e:
        raise ClusterError(
            f"--address {address}: cannot resolve the host {host!r} ({e.strerror}); give the head node's IP "
            "address or a name this machine resolves"
        ) from None
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ClusterError(
            f"no Ray cluster at {address} ({why}); start one there with `ray start --head --port {port}`, or "
            "check the address (and that no firewall is in the way)"
        ) from None
    box: dict[str, Any] = {}
    abandoned = threading.Event()

    def join() -> None:
        try:
            ray.init(address=address, log_to_driver=False)
        except BaseException as e:  # reported by the caller
            box["error"] = e
            return
        if abandoned.is_set():
            ray.shutdown()
        else:
            box["ok"] = True

    quiet = _DropThreadWarning()
    worker_log = logging.getLogger("ray._private.worker")
    worker_log.addFilter(quiet)
    try:
        th = threading.Thread(target=join, name="zipmoe-ray-connect", daemon=True)
        th.start()
        th.join(max(0.1, deadline - time.monotonic()))
    finally:
        worker_log.removeFilter(quiet)
    if th.is_alive():
        abandoned.set()
        raise ClusterError(
            f"the Ray cluster at {address} did not answer within {timeout:g} s (something listens on that "
            "port, but it is not a Ray head node, or it is overloaded); check the address or raise "
            "--connect-timeout"
        )
    if "error" in box:
        e = box["error"]
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"cannot join the Ray cluster at {address}: {first}") from None


def wait(refs):
    """``ray.get`` that raises the zipmoe error inside a failed task (ChecksumError, not RayTaskError)."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise _zipmoe_or(e) from None
    except ray.exceptions.ActorDiedError as e:
        cause = getattr(e, "cause", None) or e
        err = _zipmoe_or(cause) if isinstance(cause, Exception) else e
        raise (_from_creation_error(e) or err) if err is e else err from None


def _zipmoe_or(e: BaseException) -> BaseException:
    u = unwrap(e)
    return u if isinstance(u, ZipMoEError) else e


def _from_creation_error(e: BaseException) -> ZipMoEError | None:
    """The zipmoe error an actor's ``__init__`` raised (a damaged store found while the executor loads its
    model), rebuilt from the ActorDiedError, which keeps only its formatted traceback."""
    from .. import errors

    found = re.findall(r"zipmoe_ray\.errors\.(\w+): ([^\n]+)", str(e))
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, ZipMoEError):
        return cls(message.strip())
    return None


def _calibrate_lanes(store_dir: str, read_options) -> tuple[dict, dict]:
    """An I/O lane's and a decode lane's calibration, measured where this runs (a task on the executor's
    node, for lanes that will run in the executor)."""
    from .local import LocalRunner

    runner = LocalRunner.for_store(store_dir, read_options, 1)
    try:
        return runner.calibrate()
    finally:
        runner.shutdown()


class RayBackend(Backend):
    """Stages as actors on one node: this program's (``node``), the node ``config.resources`` pins them to,
    or wherever the caller placed the ``stages`` it hands in (those are never killed here)."""

    name = "ray"

    def __init__(
        self,
        store_dir: str,
        store,
        config,
        *,
        started_ray: bool,
        node: NodeInfo | None = None,
        stages: Stages | None = None,
    ):
        super().__init__(store_dir, store, config)
        self.started_ray = started_ray
        self.node = node
        self.given = stages
        self._owned: list = []  # actors started here: killed on close
        self._place = pin(node) if node is not None else {}
        if config.resources:
            self._place = {"resources": dict(config.resources)}

    # -- start-up ----------------------------------------------------------------------------------------
    @property
    def pieces_in_place(self) -> bool:  # type: ignore[override]
        """Lanes in the executor decode an expert's pieces into one shared buffer, as the local backend's."""
        return self.colocated

    @property
    def colocated(self) -> bool:
        """The lanes run as threads in the executor's process (``lanes`` "executor" or "auto" on one node,
        stages not handed in; backends/colocated.py)."""
        return self.name == "ray" and self.given is None and self.config.lanes in ("auto", "executor")

    def start_lanes(self) -> None:
        if self.given is not None:
            self.loader, self.decompressors = self.given.loader, self.given.decompressors
            return
        cfg = self.config
        if self.colocated:  # started by the executor, in its process
            self.loader, self.decompressors = None, []
            return
        self.loader = start_loader(self.store_dir, cfg.read_options(), **self._place)
        self.decompressors = start_decompressors(self.store_dir, cfg.workers, **self._place)
        self._owned = [self.loader, *self.decompressors]
        wait([a.ping.remote() for a in self._owned])

    def calibrate(self):
        from ..schedule.costs import CostModel

        if self.colocated:  # the lanes will run in the executor: measured on its node, in one short task
            import ray

            task = ray.remote(num_cpus=0)(_calibrate_lanes).options(**self._place)
            return CostModel.calibrated(*wait(task.remote(self.store_dir, self.config.read_options())))
        io, dec = wait(
            [
                self.loader.calibrate.remote(None, 16 << 20),
                self.decompressors[0].calibrate.remote(None, 16 << 20),
            ]
        )
        return CostModel.calibrated(io, dec)

    def start_pipeline(self, sched_config, costs) -> None:
        if self.given is not None:
            self.scheduler, self.executor = self.given.scheduler, self.given.executor
        else:
            cfg = self.config
            transport = None
            if self.colocated:
                from .colocated import ColocatedTransport, start_colocated_scheduler

                self.scheduler = start_colocated_scheduler(
                    self.store_dir, sched_config, cfg.workers, **self._place
                )
                transport = ColocatedTransport(
                    self.scheduler, self.store_dir, cfg.read_options(), cfg.workers
                )
            else:
                self.scheduler = start_scheduler(
                    self.store_dir, sched_config, self.loader, self.decompressors, **self._place
                )
            self.executor = start_executor(
                self.store_dir,
                self.scheduler,
                device=cfg.device,
                dtype=cfg.dtype,
                torch_threads=cfg.torch_threads,
                timeline=cfg.timeline,
                prefetch=cfg.prefetch,
                transport=transport,
                **self._place,
            )
            self._owned += [self.scheduler, self.executor]
        wait([self.scheduler.ping.remote(), self.executor.ping.remote()])
        self._started_pipeline(costs)

    def _started_pipeline(self, costs) -> None:
        self.device = self.call("executor", "stats")["device"]
        self.call("scheduler", "set_costs", costs)
        self.reset_stats()

    # -- running -------------------------------------------------------------------------------------------
    def _stage(self, stage: str):
        return {"scheduler": self.scheduler, "executor": self.executor}[stage]

    def call(self, stage: str, method: str, *args) -> Any:
        return wait(getattr(self._stage(stage), method).remote(*args))

    def send(self, stage: str, method: str, *args) -> None:
        getattr(self._stage(stage), method).remote(*args)  # fire and forget: ordered after earlier calls

    def stream(self, request):
        import ray

        for ref in self.executor.generate_stream.options(num_returns="streaming").remote(request):
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise _zipmoe_or(e) from None

    def lane_stats(self, sched: dict) -> LaneStats:
        name, address = (self.node.name, self.node.address) if self.node else ("local", "local")
        if self.colocated:
            loader, decs = wait(self.executor.lane_stats.remote())
        else:
            got = wait([self.loader.stats.remote(), *(d.stats.remote() for d in self.decompressors)])
            loader, decs = got[0], got[1:]
        homed = len(self.store.index.experts)
        return LaneStats({name: node_entry(address, loader, decs, None, sched, homed)}, [loader], decs)

    def read_timelines(self) -> list[tuple[str, dict]]:
        name = self.node.name if self.node else "local"
        if self.colocated:
            return [(name, wait(self.executor.lane_read_timeline.remote()))]
        return [(name, wait(self.loader.read_timeline.remote()))]

    def _stages(self) -> list:
        lanes = [] if self.loader is None else [self.loader, *self.decompressors]
        return [*lanes, self.scheduler, self.executor]

    def reset_stats(self) -> None:
        wait([a.reset_stats.remote() for a in self._stages()])

    def close(self) -> None:
        try:
            import ray
        except ImportError:
            return
        owned, self._owned = self._owned, []
        if not ray.is_initialized():
            return
        if self.started_ray:
            self.started_ray = False
            ray.shutdown()  # the embedded cluster goes, and every actor with it
        elif owned:
            kill_and_wait(owned)  # on a shared cluster: gone before close() returns
