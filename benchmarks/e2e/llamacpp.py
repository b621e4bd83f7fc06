"""llama.cpp as a benchmarked system: what most people run on an edge board.

The ``xllamacpp`` wheel is a prebuilt llama.cpp CPU build (no AVX-512; no ``llama-cli``) with its server
in process: requests go to ``Server.handle_completions`` (the OpenAI completions endpoint of
``llama-server``) as token ids, greedy, streamed so that each token's arrival time is seen, with
``logprobs`` so that each chunk names its token id. The model is the BF16 GGUF of the same checkpoint
(convert.py), memory-mapped as llama.cpp does by default, so the kernel pages experts in on demand (with
readahead) and, under the memory cgroup's cap (runner.py: non-expert bytes + budget + an allowance), evicts
them again. Nothing is cached between requests outside that budget: the prompt cache, the host-RAM slot
cache and idle-slot caching are off. Its numerics are llama.cpp's (F32 norms and routers, its own kernels),
not transformers', so its tokens may differ from the floor's: ``tokens_match`` says whether they did.
The server also opens an HTTP listener on 127.0.0.1 (an ephemeral port) that nothing here uses; it goes
with the child process.
"""

from __future__ import annotations

import os
import threading
import time


def server_params(gguf: str, batch: int, n_ctx: int, threads: int):
    """llama.cpp's parameters for the benchmark: memory-mapped, greedy, ``batch`` slots, no cache that
    would hold tokens or weights outside the budget, CPU only. Needs xllamacpp."""
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = gguf
    p.n_ctx = n_ctx * batch  # split evenly over the slots
    p.n_parallel = batch
    p.n_gpu_layers = 0
    p.load_mode = xlc.llama_load_mode.LLAMA_LOAD_MODE_MMAP  # memory-mapped, as llama.cpp does by default
    p.fit_params = False  # use these settings as given, no probing of free memory
    p.cache_prompt = False  # no prompt (KV) reuse between requests
    p.cache_ram_mib = 0  # no host-RAM slot cache
    p.cache_idle_slots = False
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.sampling.temp = 0.0
    p.sampling.top_k = 1
    p.verbosity = 0
    return p


class _Stream:
    """One request's streamed chunks: token ids and the time each arrived."""

    def __init__(self):
        self.ids: list[int] = []
        self.times: list[float] = []
        self.timings: dict = {}

    def __call__(self, chunk: dict) -> None:
        now = time.perf_counter()
        if "timings" in chunk:
            self.timings = chunk["timings"]
        for choice in chunk.get("choices", []):
            for tok in (choice.get("logprobs") or {}).get("content") or []:
                self.ids.append(int(tok["id"]))
                self.times.append(now)


def complete(server, prompts: list[list[int]], n: int) -> tuple[list[_Stream], float, float]:
    """Greedy completions of ``prompts`` (token ids), ``n`` new tokens each, all at once (one thread per
    request; the server batches them in its slots). Blocks; returns the streams, start and end time."""
    streams = [_Stream() for _ in prompts]
    errors: list[BaseException] = []

    def one(ids, stream):
        req = {"prompt": ids, "max_tokens": n, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
               "logprobs": 1, "stream": True}  # fmt: skip
        try:
            server.handle_completions(req, stream)
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(p, s)) for p, s in zip(prompts, streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = time.perf_counter()
    if errors:
        raise RuntimeError(f"llama.cpp request failed: {errors[0]}")
    return streams, t0, t1


def run_llamacpp(spec: dict, bytes_read=lambda: None) -> dict:
    """Load the GGUF, warm up on ``spec["warm"]``, then measure ``spec["prompts"]``: the same result keys as
    the other systems. Blocks; runs in the benchmark's child process (inside its cgroup)."""
    import xllamacpp as xlc

    batch = len(spec["prompts"])
    longest = max(len(p) for p in spec["prompts"] + spec["warm"])
    n_ctx = longest + max(spec["new_tokens"], spec["warm_tokens"]) + 16
    t0 = time.perf_counter()
    server = xlc.Server(server_params(spec["gguf"], batch, n_ctx, os.cpu_count() or 1))
    load_s = time.perf_counter() - t0
    try:
        complete(server, spec["warm"], spec["warm_tokens"])
        io0 = bytes_read()
        streams, t, t_end = complete(server, spec["prompts"], spec["new_tokens"])
        io1 = bytes_read()
    finally:
        del server  # stops its threads and its HTTP listener (127.0.0.1, an ephemeral port, unused here)
    rows = [s.ids for s in streams]
    firsts = [s.times[0] for s in streams if s.times]
    tpots = [(s.times[-1] - s.times[0]) / (len(s.times) - 1) for s in streams if len(s.times) > 1]
    ntok = sum(len(r) for r in rows)
    return {
        "token_ids": rows,
        "load_s": load_s,
        "generation_s": t_end - t,
        "ttft_s": (max(firsts) - t) if firsts else None,
        "tpot_s": sum(tpots) / len(tpots) if tpots else 0.0,
        "tokens_per_s": ntok / (t_end - t),
        "bytes_read": None if io0 is None else io1 - io0,
        "hit_rate": None,
        "llamacpp_timings": streams[0].timings,  # llama.cpp's own count, for comparison
    }
