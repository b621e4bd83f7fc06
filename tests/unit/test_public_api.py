"""The public API is small and pinned: changing it is a deliberate act that updates this test."""

import zipmoe_ray

EXPECTED = {
    "ArchitectureError",
    "BudgetError",
    "CheckpointError",
    "ChecksumError",
    "ClusterError",
    "CompressOptions",
    "ConfigError",
    "CountTrace",
    "DeviceProfile",
    "DTypeError",
    "EngineConfig",
    "GenerationOutput",
    "Plan",
    "Workload",
    "ZipMoEEngine",
    "FormatVersionError",
    "ReadOptions",
    "Store",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "ZipMoEError",
    "__version__",
    "build_tiny_model",
    "calibrate",
    "compress",
    "decode",
    "encode",
    "inspect_store",
    "load_profile",
    "make_plan",
    "open_store",
    "simulate",
    "supported_architectures",
    "verify_store",
}


def test_public_api_is_pinned():
    assert set(zipmoe_ray.__all__) == EXPECTED


def test_every_public_name_resolves():
    for name in zipmoe_ray.__all__:
        assert getattr(zipmoe_ray, name) is not None


def test_errors_pickle_across_processes():
    import pickle

    for name in zipmoe_ray.__all__:
        obj = getattr(zipmoe_ray, name)
        if isinstance(obj, type) and issubclass(obj, zipmoe_ray.ZipMoEError):
            e = pickle.loads(pickle.dumps(obj("layer 3, expert 7: bad")))
            assert type(e) is obj and str(e) == "layer 3, expert 7: bad"
            assert isinstance(e, zipmoe_ray.ZipMoEError)


def test_actor_api_is_pinned():
    import zipmoe_ray.actors as actors

    assert set(actors.__all__) == {
        "Decompressor", "Executor", "GenerateRequest", "GenerateResult", "IOLoader", "Scheduler",
        "SchedulerConfig", "Stages", "actor_classes", "object_store_usage", "start_decompressors",
        "start_executor", "start_loader", "start_scheduler",
    }  # fmt: skip
