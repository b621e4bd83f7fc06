"""ComputeThread (stages/compute_thread.py): every call runs on its one thread, in order; errors reach the
caller; a call made from the thread itself runs at once."""

from __future__ import annotations

import threading

import pytest

from zipmoe_ray.stages.compute_thread import ComputeThread


def test_calls_from_many_threads_all_run_on_the_one_thread_in_order():
    ct = ComputeThread("t-compute")
    seen, order = set(), []

    def job(i):
        seen.add(threading.current_thread().name)
        order.append(i)
        return i * i

    results = {}
    callers = [threading.Thread(target=lambda i=i: results.update({i: ct.call(job, i)})) for i in range(8)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(10)
    assert results == {i: i * i for i in range(8)}
    assert seen == {"t-compute"} and sorted(order) == list(range(8))
    futs = [ct.submit(job, i) for i in range(8, 12)]
    assert [f.result(10) for f in futs] == [64, 81, 100, 121] and order[-4:] == [8, 9, 10, 11]
    last = ct.submit(job, 12)
    ct.stop()  # the thread ends once what was submitted before is done (a stream's thread of its own)
    assert last.result(10) == 144
    ct._thread.join(10)
    assert not ct._thread.is_alive()


def test_an_error_reaches_the_caller_and_the_thread_goes_on():
    ct = ComputeThread()

    def boom():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        ct.call(boom)
    assert ct.call(lambda: 7) == 7
    # a call from the thread itself runs at once instead of waiting for itself
    assert ct.call(lambda: ct.call(lambda: threading.current_thread().name)) == "zipmoe-compute"
    ct.stop()


def test_the_executor_actor_gets_a_short_openmp_spin_unless_the_user_set_a_wait_policy(monkeypatch):
    from zipmoe_ray.backends.ray_stages import EXECUTOR_SPINCOUNT, SEE_GPUS, executor_env

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = executor_env({"env_vars": {"A": "1"}, "pip": ["x"]})
    assert env["env_vars"]["GOMP_SPINCOUNT"] == EXECUTOR_SPINCOUNT and env["env_vars"]["A"] == "1"
    assert env["pip"] == ["x"]
    assert "GOMP_SPINCOUNT" not in executor_env({"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})["env_vars"]
    # the user's own: passed on (a cluster's workers do not inherit it)
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    assert executor_env(None)["env_vars"]["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert executor_env(None)["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "GOMP_SPINCOUNT" not in executor_env(None)["env_vars"]
    # the caller's runtime_env wins over this process's environment
    assert executor_env({"env_vars": {"GOMP_SPINCOUNT": "7"}})["env_vars"] == {
        "GOMP_SPINCOUNT": "7",
        **SEE_GPUS["env_vars"],
    }
