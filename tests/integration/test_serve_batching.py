"""The server's parts below HTTP, on a local-backend engine (no Ray): per-row stopping and cancellation in the
engine against plain transformers, the batching queue's bit-exactness contract, 429, cancellation, stop
sequences, request validation and the API key."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch

pytest.importorskip("fastapi")

from zipmoe_ray import ZipMoEEngine
from zipmoe_ray.serve.batcher import Batcher, Job, Sampling
from zipmoe_ray.serve.config import BATCH_WAIT_ROUNDS, ServeConfig
from zipmoe_ray.serve.errors import ApiError
from zipmoe_ray.serve.metrics import ServeMetrics
from zipmoe_ray.serve.protocol import ChatRequest, CompletionRequest, parse_body
from zipmoe_ray.serve.text import RowText

from ..runtime_helpers import BATCH4, padded


@pytest.fixture(scope="module")
def engine(tiny_stores):
    with ZipMoEEngine(
        tiny_stores["qwen2_moe"], memory_budget="25%", backend="local", num_decompressors=2, calibrate=False
    ) as e:
        yield e


def _decode(engine):
    lock = threading.Lock()

    def decode(ids):
        with lock:
            return engine.tokenizer.decode(ids, skip_special_tokens=True)

    return decode


class _Collect:
    """A job's sink: events by kind, and a flag once the job ended."""

    def __init__(self):
        self.events: list[tuple] = []
        self.done = threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev[0] in ("end", "error"):
            self.done.set()

    def finished(self) -> dict[int, tuple]:
        return {ev[1]: ev for ev in self.events if ev[0] == "finish"}


def _job(prompt, n_tokens, sink, **kw):
    return Job([list(prompt)], [n_tokens], Sampling(), sink, **kw)


def test_row_limits_and_cancel_match_transformers_stopping_rows(tiny_models, engine):
    """stream_batch with a limit per row equals transformers' generate with a per-row StoppingCriteria (a
    stopped row is padded and leaves the other rows' tokens as they were); cancelling every row ends the
    generation early."""
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    limits = [3, 10, 6, 10]

    class Rows(StoppingCriteria):
        def __init__(self):
            self.step = 0

        def __call__(self, input_ids, scores, **kw):
            self.step += 1
            return torch.tensor([self.step >= n for n in limits])

    m = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2_moe"], dtype=torch.bfloat16).eval()
    ids, mask = padded(BATCH4, m.generation_config.pad_token_id, left=True)
    with torch.no_grad():
        out = m.generate(
            ids, attention_mask=mask, max_new_tokens=10, stopping_criteria=StoppingCriteriaList([Rows()])
        )
    want = [row[ids.shape[1] :][:n] for row, n in zip(out.tolist(), limits)]
    got: list[list[int]] = [[] for _ in BATCH4]
    for step in engine.stream_batch(BATCH4, limits, batch_id="rows"):
        for r, tok in enumerate(step):
            if tok is not None:
                got[r].append(tok)
    assert got == want
    steps = 0
    for steps, _ in enumerate(engine.stream_batch(BATCH4, 10, batch_id="gone"), start=1):
        if steps == 2:
            engine.cancel("gone", [0, 1, 2, 3])
    assert steps < 10 and len(engine._last.step_times) < 10


def test_a_batch_equals_generate_on_that_batch_and_max_batch_1_equals_solo(engine):
    prompts = [p for p in BATCH4 if len(p) > 1]
    for max_batch in (4, 1):
        b = Batcher(engine, max_batch, 8, ServeMetrics(max_batch), _decode(engine), start=False)
        sinks = [_Collect() for _ in prompts]
        for p, s in zip(prompts, sinks):
            b.submit(_job(p, 8, s))
        b.start()
        assert all(s.done.wait(120) for s in sinks)
        b.close()
        fins = [s.finished()[0] for s in sinks]
        batches = {f[4][0] for f in fins}
        if max_batch == 1:
            assert len(batches) == len(prompts)
            want = [engine.generate(p, 8).token_ids for p in prompts]
        else:
            assert len(batches) == 1 and [f[4][1] for f in fins] == list(range(len(prompts)))
            want = [o.token_ids for o in engine.generate(prompts, 8)]
        assert [f[3] for f in fins] == want
        texts = ["".join(ev[2] for ev in s.events if ev[0] == "delta") for s in sinks]
        assert texts == [engine.tokenizer.decode(w, skip_special_tokens=True) for w in want]


def test_queue_full_is_429_and_a_cancelled_request_never_runs(engine):
    m = ServeMetrics(2)
    b = Batcher(engine, 2, 2, m, _decode(engine), start=False)
    first, second, third = _Collect(), _Collect(), _Collect()
    j1 = _job(BATCH4[0], 4, first)
    b.submit(j1)
    b.submit(_job(BATCH4[1], 4, second))
    with pytest.raises(ApiError) as e:
        b.submit(_job(BATCH4[2], 4, third))
    assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
    b.cancel(j1)
    b.start()
    assert second.done.wait(120)
    b.close()
    assert first.events == [] and j1.ended and m.cancelled._value.get() == 1
    assert second.finished()[0][4][2] == 1  # ran alone: the cancelled request left the queue


def test_an_idle_batcher_waits_for_a_burst_until_it_pauses_and_no_longer_than_its_bound(engine):
    b = Batcher(engine, 8, 8, ServeMetrics(8), _decode(engine), start=False, wait_s=0.05)
    jobs = [_job(BATCH4[0], 4, _Collect()) for _ in range(3)]
    for job, at in zip(jobs, (100.0, 100.03, 100.06)):  # gaps shorter than wait_s, spread longer
        job.arrived = at
        b.submit(job)
    assert b._gather_deadline() == pytest.approx(100.11)  # the last arrival + wait_s, not the first's
    for i, job in enumerate(jobs):  # a steady trickle: bounded from the first arrival
        job.arrived = 100.0 + 0.4 * i
    assert b._gather_deadline() == pytest.approx(100.0 + BATCH_WAIT_ROUNDS * 0.05)
    b.close()


def test_cancelling_a_running_request_stops_its_rows(engine):
    b = Batcher(engine, 4, 8, ServeMetrics(4), _decode(engine))
    seen = threading.Event()
    box: dict = {}

    def sink(ev):
        if ev[0] == "delta":
            seen.set()

    job = _job(BATCH4[0], 200, sink)
    b.submit(job)
    assert seen.wait(120)
    b.cancel(job)
    for _ in range(600):  # the generation ends once its only row is stopped
        if b.depth() == (0, 0):
            break
        threading.Event().wait(0.1)
    box["steps"] = len(engine._last.step_times) if engine._last else 0
    b.close()
    assert b.depth() == (0, 0) and job.ended and box["steps"] < 200


def test_stop_sequences_cut_the_text_and_stream_pieces_add_up(engine):
    ids = engine.generate(BATCH4[0], 16).token_ids
    full = engine.tokenizer.decode(ids, skip_special_tokens=True)
    decode = _decode(engine)
    t = RowText(decode)
    assert "".join(t.add(i) for i in ids) + t.flush() == full
    stop = full[5:8]
    t = RowText(decode, (stop,))
    pieces = "".join(t.add(i) for i in ids if not t.stopped) + t.flush()
    assert t.stopped and pieces == full[: full.index(stop)]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "m", "prompt": ', None),
        (b"[1, 2]", None),
        (b'{"model": "m", "prompt": "x", "max_tokens": "12"}', "max_tokens"),
        (b'{"model": "m", "prompt": "x", "temperature": "hot"}', "temperature"),
        (b'{"model": "m", "prompt": "x", "n": 1.5}', "n"),
        (b'{"model": "m", "prompt": "x", "logprobs": 2}', "logprobs"),
        (b'{"model": "m", "prompt": "x", "top_p": 0}', "top_p"),
        (b'{"prompt": "x"}', "model"),
    ],
)
def test_bad_completion_bodies_are_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse_body(body, CompletionRequest)
    assert e.value.status == 400 and e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_bodies():
    ok = parse_body(
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(), ChatRequest
    )
    assert ok.limit is None and ok.messages[0].text() == "hi"
    with pytest.raises(ApiError) as e:
        parse_body(b'{"model": "m", "messages": [{"role": "robot", "content": "hi"}]}', ChatRequest)
    assert e.value.param == "messages"
    with pytest.raises(ApiError):
        parse_body(b'{"model": "m", "messages": [], "tools": [{"type": "function"}]}', ChatRequest)


def test_api_key(engine, tiny_stores):
    from starlette.requests import Request

    from zipmoe_ray.serve.handlers import OpenAIServer

    server = OpenAIServer(ServeConfig.for_tests(tiny_stores["qwen2_moe"], api_key="sesame"), engine=engine)

    def call(headers):
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/v1/models",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "query_string": b"",
        }
        return asyncio.run(server.handle("models", Request(scope), server.models))

    try:
        assert call({}).status_code == 401
        assert call({"Authorization": "Bearer nope"}).status_code == 401
        r = call({"Authorization": "Bearer sesame"})
        assert r.status_code == 200 and json.loads(r.body)["data"][0]["id"] == "qwen2_moe"
    finally:
        server.close()
