"""The Ray backend's handles: a TaskRunner over loader and decompressor actors (inside the scheduler
actor) and the executor's Transport to the scheduler actor, ObjectRef results and other nodes' ExpertHosts.

Hot path per MoE layer: one ``Scheduler.request`` call that submits one task per missing expert (or
piece) to the loader and decompressor actors and returns their ObjectRefs; the executor ``ray.wait``s on
them and reads each result zero-copy. The scheduler never fetches a payload.
"""

from __future__ import annotations

import logging

from ..errors import ZipMoEError
from ..stages.protocol import Later

__all__ = ["COMPUTE", "RayRunner", "RayTransport", "kill", "unwrap"]

log = logging.getLogger(__name__)

COMPUTE = "compute"  # ExpertHost's concurrency group for expert computation


def kill(actors: list) -> None:
    """Ask Ray to end ``actors`` for good (no restart); one already gone is skipped."""
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:  # already dead, or its handle was never registered
            log.debug("kill %s: %s", actor, e)


def unwrap(e: BaseException) -> BaseException:
    """The zipmoe error inside a Ray task error, so callers see ChecksumError, not RayTaskError."""
    cause = getattr(e, "cause", None)
    while cause is not None and not isinstance(cause, ZipMoEError):
        cause = getattr(cause, "cause", None)
    return cause if isinstance(cause, ZipMoEError) else e


class RayRunner:
    """TaskRunner over actors (built inside the scheduler actor from the handles it is given)."""

    def __init__(self, loader, decompressors: list):
        self.loader = loader
        self.decompressors = list(decompressors)
        self.workers = len(self.decompressors)

    def abandon(self) -> None:
        """The node these actors run on failed: end them, so that their pending tasks fail instead of
        waiting for a node that will not come back."""
        kill([self.loader, *self.decompressors])

    def read(self, key, part):
        return self.loader.read.remote(key[0], key[1], part)

    def read_split(self, key):
        # two reads, E region first: its decode starts while the SM region is read
        return self.read(key, "exp"), self.read(key, "raw")

    def decode(self, lane, key, exp, sm, planes_only=False, part=None):
        return self.decode_lane(lane, [(key, exp, sm, planes_only, part)])[0]

    def decode_lane(self, lane, jobs):
        import ray

        decode = self.decompressors[lane].decode.remote
        # the SM region goes in unresolved (a Later): Ray would otherwise start the task only once it is
        # read, and the lane could not decompress the exponents meanwhile
        return [
            decode(k[0], k[1], None, exp, Later(sm) if isinstance(sm, ray.ObjectRef) else sm, planes, part)
            for k, exp, sm, planes, part in jobs
        ]

    def derive(self, lane, key, words, part):
        return self.decompressors[lane].derive.remote(key[0], key[1], words, part)


class RayTransport:
    """The executor's view of a scheduler actor, of ObjectRef results and, in a cluster, of the other
    nodes' ExpertHosts."""

    def __init__(self, scheduler, hosts: dict | None = None, node_timeout: float | None = None):
        """``node_timeout``: seconds to wait on another node's ``hosts`` (given with them, in a cluster)."""
        if hosts and node_timeout is None:
            raise ValueError("other nodes' hosts need a node_timeout (EngineConfig.node_timeout)")
        self.scheduler = scheduler
        self.hosts = dict(hosts or {})
        self.node_timeout = node_timeout

    def request(self, layer, misses, hits, released, used):
        return self.scheduler.request.remote(layer, misses, hits, released, used)  # resolved by resolve()

    def prefetch(self, layer, picks, released, used):
        return self.scheduler.prefetch.remote(layer, picks, released, used)  # ordered before the next request

    def resolve(self, pending):
        import ray

        try:
            return ray.get(pending)
        except ray.exceptions.RayTaskError as e:
            raise unwrap(e) from None

    def release(self, released, used) -> None:
        self.scheduler.release.remote(released, used)  # fire and forget

    def steps(self, reports) -> None:
        self.scheduler.steps.remote(reports)  # fire and forget: ordered before the next request

    def wait_any(self, handles: list, timeout: float | None = None) -> list:
        import ray

        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        return ready

    def compute(self, node: str, layer: int, expert: int, kind: str, x, w, value):
        return (
            self.hosts[node]
            .compute.options(concurrency_group=COMPUTE)
            .remote(layer, expert, kind, x, w, value)
        )

    def unresponsive(self, nodes, timeout: float) -> set[str]:
        """Of ``nodes``, those whose ExpertHost does not answer a ping within ``timeout`` seconds."""
        import ray

        pings = {self.hosts[n].ping.remote(): n for n in nodes}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout)
        alive = set()
        for r in ready:
            try:
                ray.get(r)
                alive.add(pings[r])
            except Exception:  # a ping that errors is a node that does not answer
                pass
        return set(nodes) - alive

    def node_failed(self, node: str) -> None:
        import ray

        ray.get(self.scheduler.node_failed.remote(node))
        host = self.hosts.pop(node, None)
        if host is not None:
            kill([host])

    def is_node_failure(self, e: BaseException) -> bool:
        """Errors that mean a node's work is lost (its process, node or objects died), not a bug or bad data."""
        import ray

        lost = (
            ray.exceptions.RayActorError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.OwnerDiedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.WorkerCrashedError,
        )
        return isinstance(e, lost) or isinstance(getattr(e, "cause", None), lost)

    def get(self, handle):
        import ray

        try:
            return ray.get(handle)
        except ray.exceptions.RayTaskError as e:
            raise unwrap(e) from None
