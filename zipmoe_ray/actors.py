"""The public actor API: start the pipeline's stages yourself and wire them into engines.

    from zipmoe_ray.actors import start_loader, start_decompressors, start_scheduler, start_executor, Stages
    from zipmoe_ray.actors import SchedulerConfig

    loader = start_loader(store, resources={"edge0": 0.01})
    decompressors = start_decompressors(store, 4, resources={"edge1": 0.01})   # on a second device
    scheduler = start_scheduler(store, SchedulerConfig(budget=8 << 30), loader, decompressors)
    executor = start_executor(store, scheduler, device="cuda", resources={"edge0": 0.01})
    engine = ZipMoEEngine(store, memory_budget=8 << 30, stages=Stages(loader, decompressors, scheduler, executor))

Each stage is a plain class (IOLoader, Decompressor, Scheduler, Executor) wrapped by a thin Ray actor; the
engine does not kill stages it did not start.
"""

from .backends.ray_stages import (
    Stages,
    actor_classes,
    object_store_usage,
    start_decompressors,
    start_executor,
    start_loader,
    start_scheduler,
)
from .stages.decompressor import Decompressor
from .stages.executor import Executor, GenerateRequest, GenerateResult
from .stages.loader import IOLoader
from .stages.scheduler import Scheduler, SchedulerConfig

__all__ = [
    "Decompressor",
    "Executor",
    "GenerateRequest",
    "GenerateResult",
    "IOLoader",
    "Scheduler",
    "SchedulerConfig",
    "Stages",
    "actor_classes",
    "object_store_usage",
    "start_decompressors",
    "start_executor",
    "start_loader",
    "start_scheduler",
]
