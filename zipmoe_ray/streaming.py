"""``ZipMoEEngine.stream`` and ``stream_batch``: one prompt's text piece by piece, or a batch generated step
by step, each row stoppable on its own.

``stream``: pieces that, joined, equal ``generate``'s text (runtime/text.py TextStream holds back
incomplete characters).

``stream_batch``:
what a server needs to batch concurrent requests: per step one entry per row (the token it just got, or
None once it has finished: end of text, its own ``max_new_tokens``, or cancelled by ``engine.cancel``).
Rows stop through transformers' per-row stopping (the executor's step hook returns a per-row flag): a
stopped row is padded, as transformers pads any finished row, so every other row's tokens stay those of
``generate`` on the same batch; the generation ends when every row has finished.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from .errors import ConfigError, ZipMoEError
from .runtime.request import GenerationOutput, check_sampling
from .runtime.text import TextStream
from .stages.executor import GenerateRequest

__all__ = ["stream_batch", "stream_one"]


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
    most = max(limits) if limits else int(max_new_tokens)
    given = {k: sampling.get(k) for k in ("seed", "temperature", "top_p", "top_k")}
    do_sample = sampling.get("do_sample")
    check_sampling(most, do_sample=False if do_sample is None else do_sample, **given)
    engine.text.check_length(ids, most)
    req = GenerateRequest(
        ids,
        most,
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


def stream_one(engine, prompt, max_new_tokens: int, kw: dict) -> Iterator[tuple[int, str]]:
    """See ZipMoEEngine.stream. Blocks between tokens; an error midway carries the output so far in
    ``e.partial``."""
    sampling = {k: kw.get(k) for k in ("seed", "temperature", "top_p", "top_k")}
    check_sampling(max_new_tokens, do_sample=kw.get("do_sample", False), **sampling)
    ids, single = engine.text.encode(prompt)
    if not single:
        raise ConfigError("stream() takes one prompt")
    engine.text.check_length(ids, max_new_tokens)
    req = GenerateRequest(ids, max_new_tokens, **kw, trace_request=engine._trace_request())
    t0 = time.perf_counter()
    text = TextStream(engine.text)
    eos = engine.text.eos()
    done = False
    try:
        for kind, value in engine._backend.stream(req):
            if kind == "tokens" and not done:
                tok = value[0]
                piece = text.push(tok)
                done = tok in eos or len(text.ids) >= max_new_tokens
                yield tok, piece + (text.finish() if done else "")
            elif kind == "result":
                engine._finished(value)
                rest = text.finish()
                if rest:  # stopped for a reason of its own (a stop string): the rest still comes
                    yield (text.ids[-1] if text.ids else -1), rest
    except ZipMoEError as e:
        e.partial_token_ids = [list(text.ids)]
        e.partial = GenerationOutput(list(text.ids), engine.text.decode(text.ids))
        raise
    finally:
        engine._generation_s += time.perf_counter() - t0
