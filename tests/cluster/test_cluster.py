"""One model across a real two-node Ray cluster on this machine (each node in its own network namespace).

The driver runs in the head's namespace, as a user's program attached with ``address=``; tokens and logits
are compared with plain transformers run here. Skipped where namespaces cannot be made (no root)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ..runtime_helpers import BATCH1, reference
from .netns_cluster import NetnsCluster, unavailable

WHY = unavailable()
pytestmark = [
    pytest.mark.skipif(WHY is not None, reason=f"multi-node tests need network namespaces: {WHY}"),
    pytest.mark.slow,
]

DRIVER = str(Path(__file__).with_name("cluster_driver.py"))
IDS = ",".join(map(str, BATCH1[0]))


@pytest.fixture(scope="module")
def cluster():
    c = NetnsCluster(nodes=2, cpus=1)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def qwen(tiny_models, tiny_stores):
    return tiny_models["qwen2_moe"], tiny_stores["qwen2_moe"]


def run_driver(cluster, store, *args, on_line=None, timeout=300) -> dict:
    """Run tests/cluster_driver.py in the head's namespace; ``on_line(line)`` sees each stdout line."""
    argv = cluster.exec_cmd(
        0, [sys.executable, DRIVER, str(store), "--address", cluster.address, "--ids", IDS]
    )
    proc = subprocess.Popen(
        [*argv, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cluster.env(),
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    err: list[str] = []
    t = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    t.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    result = None
    try:
        for line in proc.stdout:
            if on_line:
                on_line(line.strip())
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    t.join(5)
    assert proc.returncode == 0 and result is not None, "driver failed:\n" + "".join(err)[-4000:]
    return result


def test_tokens_and_logits_equal_transformers_with_experts_spread_over_both_nodes(cluster, qwen, tmp_path):
    model, store = qwen
    ref_ids, ref_logits = reference(model, "qwen2_moe", BATCH1, 8)
    logits_path = tmp_path / "logits.pt"
    out = run_driver(
        cluster, store, "--max-new-tokens", "8", "--budget", "20%", "--logits", str(logits_path), "--timeline"
    )
    assert out["token_ids"] == ref_ids[0]
    logits = torch.load(logits_path)
    assert len(logits) == len(ref_logits)
    for step, ref in zip(logits, ref_logits):
        assert torch.equal(step, ref[0])
    nodes = out["stats"]["nodes"]
    assert set(nodes) == {"edge0", "edge1"}
    for name, n in nodes.items():
        assert n["alive"] and n["tasks"] > 0, f"no work on {name}: {n}"
        assert n["experts_homed"] > 0
    assert nodes["edge1"]["computes"] > 0  # the hidden states travelled to edge1's experts
    assert nodes["edge0"]["computes"] == 0  # the executor's node computes its own experts in the model
    assert sum(n["budget"] for n in nodes.values()) <= out["stats"]["budget"]
    # every node's loader recorded its own reads (ZipMoEEngine.read_timeline), and only those
    assert out["read_timeline_bytes"] == {k: n["bytes_read"] for k, n in nodes.items() if n["bytes_read"]}


@pytest.mark.parametrize("nodes", [None, "edge0"])
def test_cli_generate_attaches_to_the_cluster(cluster, qwen, nodes):
    model, store = qwen
    ref_ids, _ = reference(model, "qwen2_moe", BATCH1, 6)
    argv = cluster.exec_cmd(
        0,
        [
            str(Path(sys.executable).with_name("zipmoe")),
            "generate",
            str(store),
            "--prompt-ids",
            IDS,
            "--max-new-tokens",
            "6",
            "--memory-budget",
            "30%",
            "--address",
            cluster.address,
            "--json",
            *(["--nodes", nodes] if nodes else []),
        ],
    )
    r = subprocess.run(argv, capture_output=True, text=True, env=cluster.env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout)
    assert d["outputs"][0]["token_ids"] == ref_ids[0]
    assert all(v["tasks"] for v in d["stats"]["nodes"].values())
    assert sorted(d["stats"]["nodes"]) == ([nodes] if nodes else ["edge0", "edge1"])


def test_a_restarted_expert_host_rejoins_without_restarting_the_engine(cluster, qwen):
    model, store = qwen
    ref_ids, _ = reference(model, "qwen2_moe", BATCH1, 10)
    lines: list[str] = []
    out = run_driver(
        cluster,
        store,
        "--max-new-tokens",
        "10",
        "--budget",
        "20%",
        "--kill-host-after",
        "3",
        "--node-timeout",  # Ray restarts the host within seconds, longer on a busy machine: wait for it
        "60",
        on_line=lines.append,
    )
    assert "KILLED" in lines
    assert out["token_ids"] == ref_ids[0]
    assert out["stats"]["nodes"]["edge1"]["alive"]  # the node stayed: its host came back


def test_a_node_killed_mid_generation_moves_its_experts_and_tokens_stay_identical(cluster, qwen):
    """Last in this module: it takes the second node down for good. The driver kills the node itself when
    its third token arrives, so the kill cannot come after the generation, however busy the machine."""
    model, store = qwen
    ref_ids, _ = reference(model, "qwen2_moe", BATCH1, 16)
    seen: list[str] = []
    pg = cluster.groups.pop(1)  # the driver kills it: stop() must not try again
    out = run_driver(
        cluster,
        store,
        "--max-new-tokens",
        "16",
        "--budget",
        "20%",
        "--node-timeout",
        "2",
        "--kill-group",
        str(pg),
        "--kill-group-after",
        "3",
        on_line=seen.append,
    )
    assert "NODE KILLED" in seen
    assert out["token_ids"] == ref_ids[0]
    st = out["stats"]
    assert st["nodes"]["edge1"]["alive"] is False
    assert st["nodes"]["edge0"]["experts_homed"] == len(ref_homes(store))  # every expert lives on edge0 now


def ref_homes(store) -> list:
    from zipmoe_ray.store import open_store

    return open_store(store).experts()
