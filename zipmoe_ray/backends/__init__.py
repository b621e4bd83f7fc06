"""Where the pipeline's stages run: in this process, on one Ray node, or across a Ray cluster.

``open_backend`` is the one place that chooses; see base.py for the contract every backend keeps.
"""

from __future__ import annotations

from .base import STAGES, Backend, LaneStats

__all__ = ["STAGES", "Backend", "LaneStats", "open_backend"]


def open_backend(store_dir: str, store, config, stages=None) -> Backend:
    """The backend ``config`` asks for, connected (Ray attached or started) but with no stage running yet.

    ``backend="local"``: LocalBackend. ``backend="ray"``: the caller's ``stages`` if given, else stages
    pinned by ``config.resources``, else every alive node of the cluster (ClusterBackend) when there are
    several, else this program's node. Raises ConfigError (unknown ``nodes``)."""
    if config.backend == "local":
        from .local import LocalBackend

        return LocalBackend(store_dir, store, config)
    from .ray_backend import RayBackend, connect_ray

    started = connect_ray(config)
    try:
        if stages is not None and config.lanes == "executor":
            from ..errors import ConfigError

            raise ConfigError(
                "--lanes executor starts the lanes in the executor, but stages were handed in (stages=...): "
                "their lanes are the loader and decompressors given; leave lanes at 'auto'"
            )
        if stages is not None or config.resources:
            return RayBackend(store_dir, store, config, started_ray=started, stages=stages)
        from .cluster_nodes import discover_nodes

        infos = discover_nodes(list(config.nodes) if config.nodes else None)
        if len(infos) > 1:
            if config.lanes == "executor":
                from ..errors import ConfigError

                raise ConfigError(
                    f"--lanes executor runs one node's lanes in its executor, but this cluster has {len(infos)} "
                    "nodes: use --lanes actors, or name one node with --nodes"
                )
            from .cluster import ClusterBackend

            return ClusterBackend(store_dir, store, config, started_ray=started, infos=infos)
        return RayBackend(store_dir, store, config, started_ray=started, node=infos[0])
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise
