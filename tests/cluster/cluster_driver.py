"""The driver program of the cluster tests: run inside the head node's namespace, as a user's program would.

Prints ``READY`` once the engine is up, ``TOKEN id`` per generated token (with --stream) and finally
``RESULT {json}`` (token ids, the engine's stats). With --kill-host-after N it kills the ExpertHost actor of
the second node after N tokens (Ray restarts it: the engine must carry on); with --kill-group PG
--kill-group-after N it kills that process group (a whole node) itself, right when the N-th token arrives,
so the node dies mid-generation however busy the machine is."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from zipmoe_ray import ZipMoEEngine

sys.path.insert(0, str(Path(__file__).parent))
from netns_cluster import kill_group


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--address", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--budget", default="50%")
    p.add_argument("--node-timeout", type=float, default=5.0)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--logits", help="save the generated steps' logits here (torch.save)")
    p.add_argument("--kill-host-after", type=int)
    p.add_argument("--kill-group", type=int, help="a node's process group to SIGKILL mid-generation")
    p.add_argument("--kill-group-after", type=int, default=3)
    p.add_argument("--ssd-latency", type=float, default=0.0, help="emulated seconds per read: a slower run")
    p.add_argument("--timeline", action="store_true", help="also report the bytes each node's reads recorded")
    a = p.parse_args()
    ids = [int(x) for x in a.ids.split(",")]
    with ZipMoEEngine(
        a.store,
        memory_budget=a.budget,
        address=a.address,
        node_timeout=a.node_timeout,
        num_decompressors=1,
        latency=a.ssd_latency,
        bandwidth=20e6 if a.ssd_latency else None,
        timeline=a.timeline,
    ) as engine:
        print("READY", flush=True)
        tokens: list[int] = []
        if a.stream or a.kill_host_after is not None or a.kill_group is not None:
            for tok, _ in engine.stream(ids, a.max_new_tokens):
                tokens.append(tok)
                print("TOKEN", tok, flush=True)
                if a.kill_host_after is not None and len(tokens) == a.kill_host_after:
                    import ray

                    host = next(
                        ns.host for ns in engine._backend.cluster.nodes.values() if ns.host is not None
                    )
                    ray.kill(host, no_restart=False)
                    print("KILLED", flush=True)
                if a.kill_group is not None and len(tokens) == a.kill_group_after:
                    kill_group(a.kill_group)
                    print("NODE KILLED", flush=True)
        else:
            out = engine.generate(ids, a.max_new_tokens, output_logits=bool(a.logits))
            tokens = out.token_ids
            if a.logits:
                torch.save(out.logits, a.logits)
        stats = engine.stats()
        result = {"token_ids": tokens, "stats": stats}
        if a.timeline:
            read = {}
            for r in engine.read_timeline():
                read[r[6]] = read.get(r[6], 0) + r[2]
            result["read_timeline_bytes"] = read
        print("RESULT", json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
