"""The stages' contracts (stages/protocol.py): every task runner and transport keeps them."""

from __future__ import annotations

import inspect

import pytest

from zipmoe_ray.backends.colocated import ColocatedTransport, TokenRunner
from zipmoe_ray.backends.local import LocalRunner, LocalTransport
from zipmoe_ray.backends.ray_transport import RayRunner, RayTransport
from zipmoe_ray.sim.runner import SimRunner
from zipmoe_ray.stages.protocol import TaskRunner, Transport


def _members(proto) -> dict[str, inspect.Signature | None]:
    out = {}
    for name, value in vars(proto).items():
        if name.startswith("_"):
            continue
        out[name] = inspect.signature(value) if callable(value) else None
    for name in getattr(proto, "__annotations__", {}):
        out.setdefault(name, None)
    return out


def _params(sig: inspect.Signature) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in sig.parameters.values() if p.name != "self"]


def mismatches(cls, proto) -> list[str]:
    """What ``cls`` lacks of ``proto``, or offers with other parameters (names, order, defaults)."""
    bad = []
    for name, sig in _members(proto).items():
        if sig is None:  # an attribute: set in __init__ or on the class
            if name not in vars(cls) and name not in inspect.getsource(cls.__init__):
                bad.append(f"{cls.__name__}.{name} missing")
            continue
        impl = getattr(cls, name, None)
        if impl is None:
            bad.append(f"{cls.__name__}.{name} missing")
        elif _params(inspect.signature(impl)) != _params(sig):
            bad.append(f"{cls.__name__}.{name}{inspect.signature(impl)} differs from {name}{sig}")
    return bad


@pytest.mark.parametrize("cls", [LocalRunner, RayRunner, SimRunner, TokenRunner])
def test_task_runners_keep_the_contract(cls):
    assert mismatches(cls, TaskRunner) == []


@pytest.mark.parametrize("cls", [LocalTransport, RayTransport, ColocatedTransport])
def test_transports_keep_the_contract(cls):
    assert mismatches(cls, Transport) == []


def test_the_check_sees_a_difference():
    class Wrong:
        workers = 1

        def read(self, key):  # no part
            ...

    found = mismatches(Wrong, TaskRunner)
    assert any("read" in m and "differs" in m for m in found)
    assert any("decode missing" in m for m in found)
