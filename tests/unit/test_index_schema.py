"""Crafted indexes (store/schema.py, files.py): an index whose CRC is valid but whose fields are not is
refused with a StoreCorruptError naming the field, never a traceback, and never makes zipmoe read a file
outside the store directory. A hypothesis fuzz over structured and random indexes holds both."""

from __future__ import annotations

import copy
import os
import shutil
import sys
import threading
import zlib
from contextlib import contextmanager, suppress
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zipmoe_ray import open_store
from zipmoe_ray.errors import StoreCorruptError, ZipMoEError
from zipmoe_ray.store.format import INDEX_NAME, loads_index
from zipmoe_ray.store.verify import verify_store


def _body(store: Path) -> dict:
    outer = msgpack.unpackb((store / INDEX_NAME).read_bytes(), raw=False)
    return msgpack.unpackb(outer["body"], raw=False)


def _write(store: Path, body) -> None:
    """Write ``body`` as the store's index with a valid CRC (what a crafted index looks like)."""
    packed = msgpack.packb(body, use_bin_type=True)
    outer = {"magic": "zipmoe-store", "format_version": 1, "body_crc32": zlib.crc32(packed), "body": packed}
    (store / INDEX_NAME).write_bytes(msgpack.packb(outer, use_bin_type=True))


@pytest.fixture
def store(tiny_stores, tmp_path) -> Path:
    s = tmp_path / "store"
    shutil.copytree(tiny_stores["qwen2_moe"], s)
    shutil.copy(s / "experts" / "layer-0000.zmx", tmp_path / "outside.zmx")  # an exact copy, outside
    return s


def _edit(body: dict, path: tuple, value) -> dict:
    b = copy.deepcopy(body)
    node = b
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return b


CASES = [
    (("experts", 0, "tensors", 0, "shape"), "64", "shape must be a list"),
    (("experts", 0, "tensors", 0, "shape"), [64, "x"], "shape must be an integer"),
    (("experts", 0, "offset"), 4096 * 10**6, "runs past the end"),
    (("experts", 0, "offset"), 4097, "not 4096-byte aligned"),
    (("experts", 0, "length"), -1, "out of range"),
    (("experts", 0, "tensors", 0, "raw"), [0, 1, 2], "raw chunk of 1 bytes"),
    (("experts", 0, "tensors", 0, "dtype"), "int8", "dtype 'int8'"),
    (("experts", 0, "file"), "experts/layer-0001.zmx", "not its layer's data file"),
    (("layers", 0, "file"), "../outside.zmx", "not a path inside the store"),
    (("layers", 0, "file"), "/etc/passwd", "not a path inside the store"),
    (("aux_files", 0, "name"), "../../../../etc/passwd", "not a path inside the store"),
    (("dense", "files", 0, "name"), "/etc/passwd", "not a path inside the store"),
    (("source", "top_k"), 99, "out of range"),
    (("store_id",), "abc", "store_id must be 16 bytes"),
    (("experts",), [], "expert records"),
    (("codec", "codec"), "brotli", "codec 'brotli'"),
]


@pytest.mark.parametrize("path, value, message", CASES, ids=[c[2] for c in CASES])
def test_crafted_index_is_refused_naming_the_field(store, path, value, message):
    _write(store, _edit(_body(store), path, value))
    with pytest.raises(StoreCorruptError, match=message):
        open_store(store)
    with pytest.raises(StoreCorruptError, match=message):
        verify_store(store)


def test_the_acceptance_redirect_to_an_exact_copy_outside_is_refused(store):
    """Both the layer's and its experts' file pointing at a valid copy of the data outside the store."""
    body = _body(store)
    body["layers"][0]["file"] = "../outside.zmx"
    for e in body["experts"]:
        if e["layer"] == 0:
            e["file"] = "../outside.zmx"
    _write(store, body)
    with pytest.raises(StoreCorruptError, match="not a path inside the store"):
        open_store(store)


def test_a_symlink_out_of_the_store_is_refused(store):
    target = store.parent / "outside.zmx"
    data = store / "experts" / "layer-0000.zmx"
    data.unlink()
    data.symlink_to(target)
    with pytest.raises(StoreCorruptError, match="outside the store directory"):
        open_store(store)


@contextmanager
def reads_confined_to(root: Path):
    """Record every file opened meanwhile (an audit hook) that is not Python's own or the store's."""
    allowed = [str(root.resolve()), sys.prefix, sys.base_prefix, "/proc/self", "/dev/"]
    seen: list[str] = []
    state = {"on": True, "thread": threading.get_ident()}

    def hook(event, args):
        if state["on"] and event == "open" and threading.get_ident() == state["thread"] and args[0]:
            p = args[0]
            if isinstance(p, int):
                return
            real = os.path.realpath(os.fsdecode(p))
            if not any(real.startswith(a) for a in allowed):
                seen.append(real)

    _hooks.append(hook)
    try:
        yield seen
    finally:
        state["on"] = False
        _hooks.remove(hook)


_hooks: list = []
sys.addaudithook(lambda event, args: [h(event, args) for h in list(_hooks)])


def _use(store: Path) -> None:
    """Everything a user does with a store: open, read every expert, verify; only ZipMoEErrors allowed."""
    try:
        s = open_store(store)
    except ZipMoEError:
        return
    try:
        for key in s.experts():
            with suppress(ZipMoEError):
                s.read_expert(*key)
    finally:
        s.close()
    verify_store(store)


# a structured mutation: a path into the index and a replacement value of any type
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["../outside.zmx", "/etc/passwd", "experts/../../outside.zmx", "", ".", "experts"]),
    st.binary(max_size=20),
    st.lists(st.integers(min_value=-5, max_value=10**7), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:2]):  # the first two of each list: every kind of record
            yield from _paths(v, (*prefix, i))


@pytest.fixture(scope="module")
def pristine(tiny_stores, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    s = root / "store"
    shutil.copytree(tiny_stores["qwen2_moe"], s)
    shutil.copy(s / "experts" / "layer-0000.zmx", root / "outside.zmx")
    return s


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_structured_indexes_never_traceback_never_read_outside(pristine, data):
    body = _body(pristine)
    paths = sorted(_paths(body), key=repr)
    index_bytes = (pristine / INDEX_NAME).read_bytes()
    try:
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(paths[1:]))
            try:
                body = _edit(body, path, data.draw(_values))
            except (KeyError, IndexError, TypeError):  # an earlier edit changed what is there
                continue
        try:
            _write(pristine, body)
        except (TypeError, ValueError, OverflowError):  # msgpack cannot encode it: not an index
            return
        with reads_confined_to(pristine) as outside:
            _use(pristine)
        assert not outside, f"read outside the store: {outside}"
    finally:
        (pristine / INDEX_NAME).write_bytes(index_bytes)


@settings(max_examples=150, deadline=None)
@given(blob=st.binary(max_size=400), wrap=st.booleans())
def test_fuzz_random_index_bytes_are_refused_cleanly(blob, wrap):
    data = blob
    if wrap:  # random bytes behind a valid outer map and CRC: only the schema stands in the way
        data = msgpack.packb(
            {"magic": "zipmoe-store", "format_version": 1, "body_crc32": zlib.crc32(blob), "body": blob},
            use_bin_type=True,
        )
    with pytest.raises(ZipMoEError):
        loads_index(data, "fuzz")


def test_the_read_recorder_sees_a_read_outside(pristine):
    """The fuzz test's oracle can fail: a read of the copy outside the store is recorded."""
    with reads_confined_to(pristine) as outside:
        (pristine.parent / "outside.zmx").read_bytes()
        os.close(os.open(pristine / INDEX_NAME, os.O_RDONLY))
    assert outside == [str((pristine.parent / "outside.zmx").resolve())]
