"""The kill -9 loop: `zipmoe compress` and `zipmoe compress --overwrite` killed with SIGKILL at kill points
spread over the whole run (every few filesystem operations from the moment the store directory exists,
kill_driver.py). After every kill the store is either refused with a clear message or complete and
verified bit for bit (with --overwrite: the old store or the new one, whole, except for the instant
between the swap's two renames), and running the same command again succeeds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zipmoe_ray import open_store
from zipmoe_ray.errors import StoreError
from zipmoe_ray.store import compress
from zipmoe_ray.store.verify import verify_store

pytestmark = pytest.mark.slow

KILL_POINTS = 24  # per command


class Driver:
    def __init__(self, log: Path):
        self.log = log
        driver = Path(__file__).with_name("kill_driver.py")
        self.p = subprocess.Popen(
            [sys.executable, str(driver)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, argv, kill_at, watch) -> dict:
        req = {
            "argv": [str(a) for a in argv],
            "kill_at": kill_at,
            "watch": [str(w) for w in watch],
            "log": str(self.log),
        }
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def output(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


@pytest.fixture
def driver(tmp_path):
    d = Driver(tmp_path / "child.log")
    yield d
    d.close()


def _spread(total: int, n: int) -> list[int]:
    return sorted({1 + round(i * (total - 1) / (n - 1)) for i in range(n)})


def _wipe(s: Path) -> None:
    for p in [s, *s.parent.glob(f".{s.name}.zipmoe-*")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _state(s: Path, models: dict[str, Path]) -> str:
    """'complete <model>' (verified bit for bit against its checkpoint) or 'refused: <message>'."""
    try:
        store = open_store(s)
    except StoreError as e:
        assert str(e) and "Traceback" not in str(e)
        return f"refused: {e}"
    fp = store.index.source["fingerprint"]
    store.close()
    name = next((n for n, m in models.items() if fp == _fingerprint(m)), None)
    assert name is not None, "a store of neither checkpoint"
    report = verify_store(s, models[name])
    assert report.ok, f"a store that opens is not whole: {report.failures[:3]}"
    return f"complete {name}"


_fps: dict[Path, str] = {}


def _fingerprint(m: Path) -> str:
    if m not in _fps:
        from zipmoe_ray.store.checkpoint import Checkpoint

        _fps[m] = Checkpoint(m).fingerprint
    return _fps[m]


def test_kill_loop_compress(tiny_models, tmp_path, driver):
    m, s = tiny_models["qwen2_moe"], tmp_path / "s"
    argv = ["compress", m, s, "--quiet", "--workers", "1"]
    dry = driver.run(argv, None, [s])
    assert dry["status"] == 0, driver.output()
    total = dry["events"]
    assert total >= KILL_POINTS, total
    seen = []
    for k in _spread(total, KILL_POINTS):
        _wipe(s)
        r = driver.run(argv, k, [s])
        assert r["status"] == -9, f"kill point {k}: {r} {driver.output()}"
        state = _state(s, {"new": m})
        assert state == "complete new" or "compress" in state, state  # refused says what to run
        seen.append(state.split(":")[0])
        again = driver.run(argv, None, [s])
        assert again["status"] == 0, f"rerun after kill point {k} ({state}): {driver.output()}"
        assert _state(s, {"new": m}) == "complete new"
        assert not list(tmp_path.glob(".s.zipmoe-*")), list(tmp_path.glob(".s.zipmoe-*"))
    print(f"\nkill loop compress: {len(seen)} kill points of {total}: {seen.count('refused')} refused clearly, "
          f"{seen.count('complete new')} complete; every rerun succeeded")  # fmt: skip
    assert "refused" in seen and "complete new" in seen  # the points span the whole run


def test_kill_loop_compress_overwrite(tiny_models, tmp_path, driver):
    old_m, new_m, s = tiny_models["mixtral"], tiny_models["qwen2_moe"], tmp_path / "s"
    pristine = tmp_path / "pristine"
    compress(old_m, pristine)
    models = {"old": old_m, "new": new_m}
    argv = ["compress", new_m, s, "--overwrite", "--quiet", "--workers", "1"]
    shutil.copytree(pristine, s)
    dry = driver.run(argv, None, [s])
    assert dry["status"] == 0, driver.output()
    total = dry["events"]
    seen = []
    for k in _spread(total, KILL_POINTS):
        _wipe(s)
        shutil.copytree(pristine, s)
        r = driver.run(argv, k, [s])
        assert r["status"] == -9, f"kill point {k}: {r} {driver.output()}"
        if not s.exists():  # killed between the swap's two renames: both stores are whole beside it
            assert (tmp_path / ".s.zipmoe-old").is_dir() and (tmp_path / ".s.zipmoe-new").is_dir()
            state = "mid-swap"
        else:
            state = _state(s, models)
            assert state in ("complete old", "complete new"), f"kill point {k}: the store was lost: {state}"
        seen.append(state)
        again = driver.run(argv, None, [s])
        assert again["status"] == 0, f"rerun after kill point {k} ({state}): {driver.output()}"
        assert _state(s, models) == "complete new"
        assert not list(tmp_path.glob(".s.zipmoe-*"))
    print(f"\nkill loop compress --overwrite: {len(seen)} kill points of {total}: {seen.count('complete old')} "
          f"kept the old store, {seen.count('complete new')} the new one, {seen.count('mid-swap')} mid-swap; "
          "every rerun succeeded")  # fmt: skip
    assert "complete old" in seen and "complete new" in seen
