"""The CLI on ordinary mistakes: one line saying what is wrong (no traceback unless -v), before any engine
starts; a dead --address fails in bounded time naming it; a second compress of one store is refused naming
the first; plans and traces of another store are refused; a generation that fails midway prints what it
produced."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from zipmoe_ray.cli.main import main
from zipmoe_ray.store import open_store

from ..damage_helpers import late_damage  # noqa: F401  (a fixture)
from ..runtime_helpers import BATCH1


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if a command gets as far as starting an engine."""

    def refuse(*a, **kw):
        raise AssertionError("the engine was started")

    monkeypatch.setattr("zipmoe_ray.engine.ZipMoEEngine.__init__", refuse)


LOCAL = ["--backend", "local", "--no-calibrate"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-ids", "1,2,99999999"], "token id 99999999 is outside the model's vocabulary"),
        (["--prompt-ids=1,-5"], "token id -5 is outside"),
        (["--prompt-ids", ",".join(["7"] * 250), "--max-new-tokens", "10"], r"250 tokens plus 10 new.*256"),
        (["--prompt", ""], "a prompt is empty"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
        (["--prompt", "hi", "--temperature=-1", "--do-sample"], "--temperature must be greater than 0"),
        (["--prompt", "hi", "--top-p", "2"], "--top-p must be in"),
        (["--prompt", "hi", "--trace-out", "/proc/nope/x"], "cannot write the trace"),
        (["--prompt", "hi", "--trace-out", "/tmp"], "is a directory"),
    ],
)
def test_mistakes_are_refused_before_the_engine_starts(tiny_stores, capsys, no_engine, extra, message):
    rc, out, err = run(capsys, "generate", tiny_stores["qwen2_moe"], *extra, *LOCAL)
    assert rc == 1 and out == ""
    assert err.startswith("zipmoe generate: error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err


def test_minus_v_shows_the_traceback(tiny_stores, capsys, no_engine):
    rc, _, err = run(capsys, "-v", "generate", tiny_stores["qwen2_moe"], "--prompt-ids", "1,99999999", *LOCAL)
    assert rc == 1 and "Traceback" in err and "ConfigError" in err
    rc, _, err = run(capsys, "generate", tiny_stores["qwen2_moe"], "--prompt-ids", "1,99999999", *LOCAL)
    assert rc == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "--engine"], "give --store"),
        (["calibrate", "--out", "/proc/nope/p.json"], "cannot write the profile"),
        (["plan", "--store", "{store}", "--memory-budget", "30%", "--out", "/proc/nope/p.json"], "cannot write the plan"),
        (["trace", "synth", "/proc/nope/t.json", "--store", "{store}"], "cannot write the trace"),
        (["generate", "{store}", "--prompt", "hi", "--address", "notahost"], "is not HOST:PORT"),
        (["generate", "{store}", "--prompt", "hi", "--address", "notahost.invalid:6379"], "cannot resolve the host"),
        (["generate", "{store}", "--prompt", "hi", "--address", "127.0.0.1:1"], r"no Ray cluster at 127\.0\.0\.1:1"),
        (["generate", "{store}", "--prompt", "hi", "--memory-budget", "100TB", "--backend", "local"], "more than this machine's memory"),
        (["compress", "{model}", "/proc/nope/s"], "cannot create /proc/nope"),
        (["serve", "{store}", "--memory-budget", "25%", "--trace-out", "/proc/nope/t.jsonl"], "cannot write the trace"),
        (["serve", "{store}", "--memory-budget", "25%", "--plan", "/proc/nope/plan.json"], "cannot read the plan"),
    ],
)  # fmt: skip
def test_more_mistakes_get_one_line(tiny_stores, tiny_models, capsys, argv, message):
    fill = {"store": tiny_stores["qwen2_moe"], "model": tiny_models["qwen2_moe"]}
    rc, _, err = run(capsys, *[a.format(**fill) for a in argv])
    assert rc == 1 and "Traceback" not in err and re.search(message, err), err
    assert err.count("\n") == 1, err


def test_a_silent_address_fails_within_the_connect_timeout(tiny_stores, tmp_path):
    """Something listens but never answers: ray.init would retry for minutes; --connect-timeout bounds it
    (a separate process: an abandoned ray.init must not share the test process)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    stop = threading.Event()

    def accept():
        conns = []
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conns.append(server.accept()[0])
        for c in conns:
            c.close()

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        argv = [sys.executable, "-m", "zipmoe_ray.cli.main", "generate", str(tiny_stores["qwen2_moe"]),
                "--prompt", "hi", "--address", f"127.0.0.1:{port}", "--connect-timeout", "3"]  # fmt: skip
        p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        th.join()
        server.close()
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"the Ray cluster at 127.0.0.1:{port} did not answer within 3 s" in p.stderr


def test_without_address_a_cluster_in_the_environment_is_not_joined(tiny_stores):
    """No --address: the engine starts a Ray instance of its own even when RAY_ADDRESS names another
    (ray.init with no address would join it, and refuse num_cpus there). Here RAY_ADDRESS names a port
    nothing listens on: joining it could only fail."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    argv = [sys.executable, "-m", "zipmoe_ray.cli.main", "generate", str(tiny_stores["qwen2_moe"]),
            "--prompt", "hi", "--max-new-tokens", "2", "--backend", "ray"]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_two_compressions_of_one_store_refused_with_the_holder(tiny_models, tmp_path, capsys):
    from zipmoe_ray.store.lifecycle import StoreLock

    with StoreLock(tmp_path / "s"):
        rc, _, err = run(capsys, "compress", tiny_models["qwen2_moe"], tmp_path / "s", "--quiet")
    assert rc == 1 and f"(pid {os.getpid()}) is writing this store" in err and "Traceback" not in err


def test_resume_says_what_it_kept(tiny_models, tmp_path, capsys, monkeypatch):
    import zipmoe_ray.store.writer as writer

    real = writer.write_layer

    def failing(store, ckpt, layer, *a, **kw):
        if layer == 2:
            raise OSError(28, "No space left on device")
        return real(store, ckpt, layer, *a, **kw)

    monkeypatch.setattr(writer, "write_layer", failing)
    rc, _, err = run(capsys, "compress", tiny_models["qwen2_moe"], tmp_path / "s", "--quiet")
    assert rc == 1 and "Traceback" not in err
    monkeypatch.setattr(writer, "write_layer", real)
    rc, _, err = run(capsys, "compress", tiny_models["qwen2_moe"], tmp_path / "s", "--quiet")
    assert rc == 0 and "kept 2 of 3 finished layers" in err, err


def test_a_generation_failing_midway_prints_what_it_produced(late_damage, capsys):  # noqa: F811
    s, ref, step, label = late_damage
    ids = ",".join(map(str, BATCH1[0]))
    rc, out, err = run(capsys, "generate", s, "--prompt-ids", ids, "--max-new-tokens", 20, "--memory-budget",
                       "100%", "--json", *LOCAL)  # fmt: skip
    doc = json.loads(out)
    assert rc == 1 and label in err and label in doc["error"] and "Traceback" not in err
    got = doc["outputs"][0]["token_ids"]
    assert len(got) == step and got == ref.token_ids[:step]  # every token before the damaged expert
    rc, out, err = run(capsys, "generate", s, "--prompt-ids", ids, "--max-new-tokens", 20, "--memory-budget",
                       "100%", "--verify", *LOCAL)  # fmt: skip
    assert rc == 1 and "--verify" in err and label in err and out == ""


def test_plans_and_traces_of_another_store_are_refused(tiny_stores, tmp_path, capsys):
    a, b = tiny_stores["qwen2_moe"], tmp_path / "b"
    shutil.copytree(a, b)  # the same files...
    from zipmoe_ray.store import CompressOptions, compress

    src = open_store(a).index.source["path"]
    compress(src, b, CompressOptions(overwrite=True))  # ...re-made: a new store id, the same checkpoint
    plan = tmp_path / "plan.json"
    assert run(capsys, "plan", "--store", a, "--memory-budget", "30%", "--out", plan)[0] == 0
    assert json.loads(plan.read_text())["store_id"] == open_store(a).index.store_id.hex()
    rc, _, err = run(
        capsys, "generate", b, "--prompt", "hi", "--memory-budget", "30%", "--plan", plan, *LOCAL
    )
    assert rc == 1 and "the plan was made for another store" in err
    # a trace holds for every store of its checkpoint, and not for another checkpoint's
    trace = tmp_path / "t.jsonl"
    rc, _, _ = run(
        capsys, "generate", a, "--prompt-ids", "5,6", "--max-new-tokens", 2, "--trace-out", trace, *LOCAL
    )
    assert rc == 0
    assert run(capsys, "plan", "--store", b, "--trace", trace, "--memory-budget", "30%")[0] == 0
    other = tiny_stores["mixtral"]
    rc, _, err = run(capsys, "generate", other, "--prompt-ids", "5,6", "--trace-out", trace, *LOCAL)
    assert rc == 1 and "another model" in err
    head = json.loads(trace.read_text().splitlines()[0])
    head["fingerprint"] = "0" * 64
    trace.write_text("\n".join([json.dumps(head), *trace.read_text().splitlines()[1:]]) + "\n")
    rc, _, err = run(capsys, "plan", "--store", b, "--trace", trace, "--memory-budget", "30%")
    assert rc == 1 and "another checkpoint" in err


def test_budget_mismatch_of_a_plan_is_rescaled_with_a_note(tiny_stores, tmp_path, capsys, caplog):
    a = tiny_stores["qwen2_moe"]
    plan = tmp_path / "plan.json"
    assert run(capsys, "plan", "--store", a, "--memory-budget", "30%", "--out", plan)[0] == 0
    with caplog.at_level("WARNING", logger="zipmoe_ray"):
        rc, _, _ = run(capsys, "generate", a, "--prompt-ids", "5,6", "--max-new-tokens", 2, "--memory-budget",
                       "40%", "--plan", plan, *LOCAL)  # fmt: skip
    assert rc == 0 and "re-scaled to this budget" in caplog.text
