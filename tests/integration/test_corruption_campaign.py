"""The corruption campaign: one byte flipped in every region of every file of a store (data file headers and
their padding, expert exponent and sign+mantissa chunks and alignment padding, the dense weights' header
and tensors, config, tokenizer and the other small files, the index), one at a time. For each flip,
``zipmoe generate --verify`` must refuse before computing anything, and plain generation must never return
tokens that differ from the undamaged store's: it either refuses (naming what is damaged) or, when the
damaged bytes are never used, returns the same tokens. Tiny model, local backend, in process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from zipmoe_ray.cache.split import SplitRule
from zipmoe_ray.cli.main import main
from zipmoe_ray.engine import ZipMoEEngine
from zipmoe_ray.errors import ZipMoEError
from zipmoe_ray.store import open_store
from zipmoe_ray.store.format import INDEX_NAME

from ..damage_helpers import flip
from ..runtime_helpers import BATCH4

pytestmark = pytest.mark.slow

NEW_TOKENS = 4
# every expert read from disk at every use (nothing cached), so that a damaged one is met if it is used
ENGINE = {"memory_budget": "100%", "backend": "local", "calibrate": False, "num_decompressors": 1,
          "torch_threads": 1, "split": SplitRule(0.0, 0.0, 0.0), "read_mode": "page-cache"}  # fmt: skip


def regions(store: Path) -> list[tuple[str, str, int]]:
    """(what, file relative to the store, offset) for one byte in every region of every file."""
    s = open_store(store)
    out = []
    for info in s.index.layers:
        f = info["file"]
        out += [(f"{f} header magic", f, 0), (f"{f} header version", f, 9), (f"{f} header store id", f, 20),
                (f"{f} header layer", f, 29), (f"{f} header padding", f, 3000)]  # fmt: skip
        recs = sorted((r for r in s.index.experts if r.layer == info["layer"]), key=lambda r: r.offset)
        for rec in (recs[0], recs[len(recs) // 2], recs[-1]):
            name = f"{f} {rec.label()}"
            out += [(f"{name} exponent chunk", f, rec.offset + rec.e_length // 2),
                    (f"{name} sign+mantissa chunk", f, rec.offset + rec.e_length + rec.sm_length // 2),
                    (f"{name} last byte", f, rec.offset + rec.length - 1)]  # fmt: skip
            if rec.padded_length > rec.length:
                out.append((f"{name} padding", f, rec.offset + rec.length))
    for d in s.index.dense["files"]:
        size, start = d["size"], d["data_start"]
        out += [(f"{d['name']} header length", d["name"], 0), (f"{d['name']} header", d["name"], start // 2),
                (f"{d['name']} first tensor", d["name"], start), (f"{d['name']} middle", d["name"], (start + size) // 2),
                (f"{d['name']} last byte", d["name"], size - 1)]  # fmt: skip
    for a in s.index.aux_files:
        out.append((a["name"], a["name"], a["size"] // 2))
    n = (store / INDEX_NAME).stat().st_size
    out += [(f"index @{i}/5", INDEX_NAME, min(n - 1, n * i // 5)) for i in range(5)]
    s.close()
    return out


@pytest.fixture(scope="module")
def campaign_store(tiny_stores, tmp_path_factory) -> tuple[Path, list[list[int]]]:
    s = tmp_path_factory.mktemp("campaign") / "store"
    shutil.copytree(tiny_stores["qwen2_moe"], s)
    with ZipMoEEngine(s, **ENGINE) as e:
        ref = [o.token_ids for o in e.generate(BATCH4, NEW_TOKENS)]
    return s, ref


def test_every_region_of_every_file(campaign_store, capsys, monkeypatch):
    from zipmoe_ray.stages.executor import Executor

    store, ref = campaign_store
    computed: list[int] = []
    real_generate = Executor.generate

    def counting(self, req):  # records that a generation was computed, then computes it
        computed.append(1)
        return real_generate(self, req)

    monkeypatch.setattr(Executor, "generate", counting)
    ids = [a for p in BATCH4 for a in ("--prompt-ids", ",".join(map(str, p)))]
    results = {"verify refused": 0, "refused": 0, "same tokens": 0, "wrong tokens": []}
    sites = regions(store)
    assert len(sites) > 40
    for what, rel, offset in sites:
        path = store / rel
        flip(path, offset)
        try:
            computed.clear()
            argv = ["generate", str(store), *ids, "--max-new-tokens", str(NEW_TOKENS), "--verify",
                    "--backend", "local", "--no-calibrate", "--memory-budget", "100%"]  # fmt: skip
            rc = main(argv)
            out, err = capsys.readouterr()
            assert rc == 1 and out == "" and not computed, f"{what}: --verify did not refuse ({err})"
            assert "Traceback" not in err and "error:" in err
            results["verify refused"] += 1
            try:
                with ZipMoEEngine(store, **ENGINE) as e:
                    got = [o.token_ids for o in e.generate(BATCH4, NEW_TOKENS)]
            except ZipMoEError:
                results["refused"] += 1
            else:
                if got == ref:
                    results["same tokens"] += 1
                else:
                    results["wrong tokens"].append(what)
        finally:
            flip(path, offset)  # restore the byte
    print(f"\ncorruption campaign: {len(sites)} flips; {results}")
    assert results["wrong tokens"] == [], results
    assert results["verify refused"] == len(sites)
    assert results["refused"] > len(sites) // 2  # most damage is met, not just missed
