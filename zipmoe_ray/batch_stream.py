"""``ZipMoEEngine.stream_batch``: a batch generated step by step, each row stoppable on its own.

What a server needs to batch concurrent requests: per step one entry per row (the token it just got, or
None once it has finished: end of text, its own ``max_new_tokens``, or cancelled by ``engine.cancel``).
Rows stop through transformers' per-row stopping (the executor's step hook returns a per-row flag): a
stopped row is padded, as transformers pads any finished row, so every other row's tokens stay those of
``generate`` on the same batch; the generation ends when every row has finished.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from .errors import ConfigError
from .stages.executor import GenerateRequest

__all__ = ["stream_batch"]


def stream_batch(
    engine, prompts, max_new_tokens: int | list[int], batch_id: str | None, sampling: dict
) -> Iterator[list[int | None]]:
    """See ZipMoEEngine.stream_batch. Blocks between steps; raises what ``generate`` raises."""
    ids, single = engine.text.encode(prompts)
    if single:
        ids = [ids[0]]
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else None
    if limits is not None and len(limits) != len(ids):
        raise ConfigError(f"{len(limits)} max_new_tokens for {len(ids)} prompts: give one per prompt")
    req = GenerateRequest(
        ids,
        max(limits) if limits else int(max_new_tokens),
        **sampling,
        trace_request=engine._trace_request(),
        row_limits=limits,
        batch_id=batch_id,
    )
    limits = req.row_limits or [req.max_new_tokens] * len(ids)
    cancelled = engine._cancelled.setdefault(batch_id, set()) if batch_id is not None else set()
    eos = engine.text.stop_ids()
    count = [0] * len(ids)
    finished = [False] * len(ids)
    t0 = time.perf_counter()
    try:
        for kind, value in engine._backend.stream(req):
            if kind == "tokens":
                out: list[int | None] = []
                for row, tok in enumerate(value):
                    if finished[row] or row in cancelled:
                        finished[row] = True
                        out.append(None)
                        continue
                    count[row] += 1
                    finished[row] = tok in eos or count[row] >= limits[row]
                    out.append(tok)
                yield out
            elif kind == "result":
                engine._finished(value)
    finally:
        engine._generation_s += time.perf_counter() - t0
        if batch_id is not None:
            engine._cancelled.pop(batch_id, None)
