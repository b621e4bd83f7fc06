"""The engine's promises on damage and on text: verify=True refuses a damaged store before anything starts;
without it, a damaged expert met midway fails the request naming it and the tokens produced so far come
with the error (both backends); streamed text joins to exactly the generated text."""

from __future__ import annotations

import pytest

from zipmoe_ray.engine import ZipMoEEngine
from zipmoe_ray.errors import ChecksumError, StoreCorruptError

from ..damage_helpers import late_damage  # noqa: F401  (a fixture)
from ..runtime_helpers import BATCH1, start_ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = start_ray()
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_damaged_expert_midway_returns_the_tokens_so_far(late_damage, backend, request):  # noqa: F811
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    s, ref, step, label = late_damage
    with ZipMoEEngine(s, memory_budget="100%", backend=backend, calibrate=False, num_decompressors=1) as e:
        with pytest.raises(ChecksumError, match=label) as info:
            e.generate(BATCH1[0], max_new_tokens=20)
        assert (
            info.value.partial.token_ids == ref.token_ids[:step] and len(info.value.partial.token_ids) == step
        )
        assert info.value.partial.text == e.text.decode(ref.token_ids[:step])
        with pytest.raises(ChecksumError, match=label) as info:
            list(e.stream(BATCH1[0], 20))
        assert info.value.partial.token_ids == ref.token_ids[:step]


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_damaged_dense_weights_are_refused_on_both_backends(tiny_stores, tmp_path, backend, request):
    """The executor checks them before loading; from inside a Ray actor's start the error still arrives
    as itself, naming file and tensor."""
    import shutil

    from ..damage_helpers import flip

    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    s = tmp_path / "s"
    shutil.copytree(tiny_stores["qwen2_moe"], s)
    dense = s / "model.zipmoe-dense.safetensors"
    flip(dense, dense.stat().st_size - 4096)
    with pytest.raises(ChecksumError, match=r"model\.zipmoe-dense\.safetensors, tensor model\."):
        ZipMoEEngine(s, memory_budget="50%", backend=backend, calibrate=False, num_decompressors=1)


def test_verify_refuses_a_damaged_store_before_starting(late_damage):  # noqa: F811
    s, _, _, label = late_damage
    with pytest.raises(StoreCorruptError, match=f"--verify: {label}"):
        ZipMoEEngine(s, memory_budget="100%", backend="local", verify=True)


def test_verify_passes_an_intact_store(tiny_stores):
    with ZipMoEEngine(
        tiny_stores["olmoe"], memory_budget="50%", backend="local", verify=True, calibrate=False
    ) as e:
        assert e.generate([5, 6, 7], 3).token_ids


def _naive_join(text, ids: list[int]) -> str:
    """What streaming gave before: each step's decoded text minus the previous one's length."""
    out, prev = [], ""
    for i in range(1, len(ids) + 1):
        now = text.decode(ids[:i])
        out.append(now[len(prev) :])
        prev = now
    return "".join(out)


def test_streamed_text_joins_to_the_generated_text(tiny_stores):
    """Random tiny models emit arbitrary byte tokens; for "A" this one completes a character from two."""
    with ZipMoEEngine(tiny_stores["qwen3_moe"], memory_budget="50%", backend="local", calibrate=False) as e:
        split = 0
        for p in ["A", "The robot"]:
            g = e.generate(p, max_new_tokens=24)
            pieces = list(e.stream(p, 24))
            assert "".join(piece for _, piece in pieces) == g.text
            assert [t for t, _ in pieces] == g.token_ids
            split += _naive_join(e.text, g.token_ids) != g.text
        assert split, "no character was split across tokens: this test would not see the difference"
        kw = {"do_sample": True, "seed": 3, "temperature": 1.5, "top_k": 50}
        g = e.generate("A", 24, **kw)
        assert "".join(piece for _, piece in e.stream("A", 24, **kw)) == g.text


@pytest.mark.parametrize(("backend", "budget"), [("local", "100%"), ("local", "25%"), ("ray", "25%")])
def test_a_generation_failing_midway_gives_back_its_staging(late_damage, backend, budget, request):  # noqa: F811
    """Experts in flight when a layer fails (delivered, in use or still being decoded) are released: the
    cache holds no staging (and, seen from inside, no flight and no pinned expert) afterwards, and the next
    request fails on the damage itself again, not on a budget the failed one kept."""
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    s, _, _, label = late_damage
    with ZipMoEEngine(s, memory_budget=budget, backend=backend, calibrate=False, num_decompressors=2) as e:
        for _ in range(2):
            with pytest.raises(ChecksumError, match=label):
                e.generate(BATCH1[0], max_new_tokens=20)
            assert e._backend.call("scheduler", "stats")["cache"]["staging"] == 0
            if backend == "local":
                sched = e._backend.scheduler
                assert not sched._flights
                assert not [k for k, x in sched.cache.entries.items() if x.pins]
