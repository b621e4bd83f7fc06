"""The zipmoe CLI end to end: tiny-model -> compress -> verify --against -> inspect, and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from zipmoe_ray.cli.main import main

from ..conftest import ARCHS


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _commands(parser, prefix=()):
    """Every command path of the parser (``("trace", "synth")`` and so on)."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


def test_every_command_has_working_help(capsys):
    from zipmoe_ray.cli.main import build_parser

    commands = list(_commands(build_parser()))
    assert {("generate",), ("chat",), ("trace", "synth")} <= set(commands)
    for cmd in commands:  # argparse %-formats help texts: a stray % breaks --help of that command
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0, cmd
        assert "usage: zipmoe" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ARCHS)
def test_end_to_end_every_architecture(arch, tmp_path, capsys):
    m, s = tmp_path / "m", tmp_path / "s"
    assert run(capsys, "tiny-model", m, "--arch", arch, "--seed", 3)[0] == 0
    rc, out, _ = run(capsys, "compress", m, s, "--workers", 2, "--quiet")
    assert rc == 0 and "ratio" in out
    rc, out, _ = run(capsys, "verify", s, "--against", m, "--quiet")
    assert rc == 0 and "bit-identical" in out
    rc, out, _ = run(capsys, "inspect", s, "--json")
    r = json.loads(out)
    assert rc == 0 and r["model_type"] == arch
    assert r["bound_ratio"] - 0.01 <= r["ratio"] <= r["bound_ratio"] + 0.015
    rc, out, _ = run(capsys, "inspect", s)
    assert rc == 0 and "bound" in out and "total" in out


def test_verify_names_the_damaged_expert(tiny_stores, tmp_path, capsys):
    s = tmp_path / "s"
    shutil.copytree(tiny_stores["mixtral"], s)
    data = s / "experts" / "layer-0001.zmx"
    n = data.stat().st_size
    with open(data, "r+b") as f:  # the acceptance recipe: 16 bytes flipped at spread offsets
        for i in range(1, 17):
            f.seek(n * i // 17)
            b = f.read(1)
            f.seek(n * i // 17)
            f.write(bytes([b[0] ^ 0x5A]))
    rc, out, _ = run(capsys, "verify", s, "--quiet")
    assert rc == 1
    assert "FAIL layer 1, expert" in out and "FAILED" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "{tmp}/missing", "{tmp}/s"], "no such directory"),
        (["verify", "{tmp}/missing"], "no such store"),
        (["inspect", "{tmp}"], "not a zipmoe store"),
        (["tiny-model", "{tmp}/m"], "needs --arch"),
        (["tiny-model", "{tmp}/m", "--preset", "mixtral", "--arch", "olmoe"], "is a mixtral model"),
        (["compress", "{tmp}", "{tmp}/s", "--level", "40"], "zstd level 40"),
    ],
)
def test_bad_input_exits_nonzero_with_a_message(tmp_path, capsys, argv, message):
    rc, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 1
    assert message in err and "error:" in err


def test_env_lists_every_variable_and_the_kernels_in_use(capsys):
    from zipmoe_ray import env
    from zipmoe_ray.codec import checksum, planes

    rc, out, _ = run(capsys, "env")
    assert rc == 0
    assert all(f"{name}=" in out for name in env.VARIABLES)
    assert f"in use: bit planes by {planes.IMPLEMENTATION}, crc32 by {checksum.IMPLEMENTATION}" in out


def test_unknown_choice_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", str(tmp_path), str(tmp_path / "s"), "--codec", "brotli"])
    assert e.value.code == 2


@pytest.mark.slow
def test_demo(tmp_path, capsys):  # the random model; the trained one: tests/test_smollm2_moe.py
    rc, out, _ = run(capsys, "demo", "--cache-dir", tmp_path, "--model", "tiny")
    assert rc == 0 and "bit-identical" in out and "ratio" in out
    rc, out, _ = run(
        capsys, "demo", "--cache-dir", tmp_path, "--model", "tiny"
    )  # reuses the model, recompresses
    assert rc == 0


def test_console_script_is_installed():
    exe = shutil.which("zipmoe") or str(__import__("pathlib").Path(sys.executable).with_name("zipmoe"))
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("zipmoe-ray ")


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_generate_json_is_bit_exact_at_10_percent(tiny_models, tiny_stores, capsys, backend):
    from ..runtime_helpers import BATCH1, reference

    ref, _ = reference(tiny_models["qwen2_moe"], "qwen2_moe", BATCH1, 12)
    ids = ",".join(map(str, BATCH1[0]))
    rc, out, _ = run(
        capsys, "generate", tiny_stores["qwen2_moe"], "--prompt-ids", ids, "--max-new-tokens", 12,
        "--memory-budget", "10%", "--backend", backend, "--num-decompressors", 2, "--json",
    )  # fmt: skip
    assert rc == 0
    doc = json.loads(out)
    assert doc["outputs"][0]["token_ids"] == ref[0]
    s = doc["stats"]
    for key in (
        "ttft_s",
        "tpot_s",
        "tokens_per_s",
        "hits",
        "misses",
        "bytes_read",
        "peak_cache_bytes",
        "budget",
    ):
        assert key in s
    assert s["misses"]["disk"] > 0 and s["peak_cache_bytes"] <= s["budget"]


def test_generate_timeline_json_carries_the_events_and_the_reads(tiny_stores, capsys):
    rc, out, _ = run(
        capsys, "generate", tiny_stores["qwen2_moe"], "--prompt-ids", "1,2,3", "--max-new-tokens", 3,
        "--memory-budget", "10%", "--backend", "local", "--ssd-bandwidth", "1GB", "--timeline", "--json",
    )  # fmt: skip
    assert rc == 0
    doc = json.loads(out)
    events, reads = doc["timeline"]["events"], doc["timeline"]["reads"]
    assert sum(1 for e in events if e[1] == "step") == 3
    assert reads and sum(r[2] for r in reads) == doc["stats"]["bytes_read"]
    rc, out, err = run(
        capsys, "generate", tiny_stores["qwen2_moe"], "--prompt-ids", "1,2,3", "--max-new-tokens", 2,
        "--memory-budget", "10%", "--backend", "local", "--timeline",
    )  # fmt: skip
    assert rc == 0 and "MoE-layer events" in err and "--json prints them" in err


def test_generate_text_batch_and_sizes(tiny_stores, capsys):
    rc, out, err = run(
        capsys, "generate", tiny_stores["olmoe"], "--prompt", "Hello robot", "--prompt", "Rivers carry sand",
        "--max-new-tokens", 4, "--memory-budget", "1MB", "--backend", "local",
    )  # fmt: skip
    assert rc == 0 and "tpot" in err and len(out.splitlines()) >= 1
    rc, _, err = run(
        capsys,
        "generate",
        tiny_stores["olmoe"],
        "--prompt",
        "x",
        "--memory-budget",
        "1KB",
        "--backend",
        "local",
    )
    assert rc == 1 and "too small" in err and "--memory-budget" in err


def test_chat_streams_replies(tiny_stores, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nand again\n/exit\n"))
    rc, out, _ = run(capsys, "chat", tiny_stores["qwen3_moe"], "--backend", "local", "--max-new-tokens", 5)
    assert rc == 0 and len(out.splitlines()) == 2


def test_trace_plan_simulate_from_the_cli(tiny_stores, tmp_path, capsys):
    store = tiny_stores["deepseek_v2"]
    trace = tmp_path / "rec.jsonl"
    rc, _, _ = run(
        capsys, "generate", store, "--prompt-ids", "5,6,7,8", "--max-new-tokens", 8, "--memory-budget", "30%",
        "--backend", "local", "--trace-out", trace,
    )  # fmt: skip
    assert rc == 0 and trace.is_file()
    assert run(capsys, "trace", "convert", trace, tmp_path / "counts.json")[0] == 0
    assert json.loads((tmp_path / "counts.json").read_text())["format"] == "zipmoe-count-trace/1"
    rc, out, _ = run(capsys, "trace", "synth", tmp_path / "syn.json", "--store", store, "--skew", "1.2")
    assert rc == 0
    rc, out, _ = run(capsys, "plan", "--trace", tmp_path / "syn.json", "--store", store, "--memory-budget", "30%",
                     "--out", tmp_path / "plan.json", "--json")  # fmt: skip
    assert rc == 0 and json.loads(out)["format"] == "zipmoe-plan/1"
    for policy in ("zipmoe", "full-lru", "full-lfu", "compressed-only"):
        rc, out, _ = run(capsys, "simulate", "--trace", trace, "--store", store, "--memory-budget", "30%",
                         "--policy", policy, "--device-profile", "orin-agx-32gb", "--json")  # fmt: skip
        r = json.loads(out)
        assert rc == 0 and {"tpot_s", "lower_bound_tpot_s", "hit_rates", "bytes_read"} <= set(r)
        assert r["lower_bound_tpot_s"] <= r["tpot_s"]
        assert r["replan"] is None  # off unless asked for
        # the trace was recorded with prefetch on: its predictions are replayed, fetched or only scored
        assert r["prefetch"]["predicted"] + r["prefetch"]["gated"] > 0
    rc, out, _ = run(capsys, "simulate", "--trace", trace, "--store", store, "--memory-budget", "30%",
                     "--replan-every", 4)  # fmt: skip
    # either a round ran, or the plan already was classic offloading's split and there is nothing to time
    assert rc == 0 and "online re-planning:" in out and "prefetch (the trace's recorded predictions)" in out
    rc, js, _ = run(capsys, "simulate", "--trace", trace, "--store", store, "--memory-budget", "30%",
                    "--replan-every", 4, "--json")  # fmt: skip
    r = json.loads(js)
    assert ("in use at the end" in out) == (r["replan"] is not None)
    if r["replan"] is None:
        assert "already is full-only" in out and r["hit_rates"].get("compressed", 0) == 0
    rc, _, err = run(capsys, "simulate", "--trace", trace, "--store", store, "--memory-budget", "30%",
                     "--replan-every", -1)  # fmt: skip
    assert rc == 1 and "replan_every must be" in err
    rc, out, _ = run(capsys, "plan", "--store", store, "--memory-budget", "30%")
    assert rc == 0 and "plan (global budget" in out
    rc, out, _ = run(
        capsys, "generate", store, "--prompt-ids", "5,6,7", "--max-new-tokens", 3, "--memory-budget", "30%",
        "--backend", "local", "--plan", tmp_path / "plan.json", "--json",
    )  # fmt: skip
    assert rc == 0
    from zipmoe_ray.plan.planner import Plan

    split = json.loads(out)["stats"]["split"]  # the engine ran the plan it was given, not one of its own
    assert split["source"] == "given plan"
    assert split["plan"] == Plan.load(str(tmp_path / "plan.json")).counts()
    rc, _, err = run(capsys, "simulate", "--trace", tmp_path / "nope.json", "--memory-budget", "30%")
    assert rc == 1 and "cannot read" in err


def test_calibrate_writes_a_profile(tmp_path, capsys):
    from zipmoe_ray.plan import load_profile

    rc, _, _ = run(capsys, "calibrate", "--out", tmp_path / "me.json")
    assert rc == 0
    p = load_profile(str(tmp_path / "me.json"))
    assert p.ssd_read_gbps > 0 and p.decompress_gbps_per_core > 0 and p.cpu_cores >= 1
    assert all(src.startswith(("measured", "one decode")) for src in p.sources.values())
