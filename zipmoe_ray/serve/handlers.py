"""OpenAIServer: the OpenAI endpoints over one ZipMoEEngine and its batcher (engine_host.py), as plain async methods taking a
Starlette request (the Serve deployment routes to them; deployment.py).

Every answer other than success is an ApiError turned into the OpenAI error shape; an unexpected exception
is logged here and answered with a 500 that carries no traceback. The server goes on serving either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import ZipMoEError
from . import protocol as P
from .batcher import Job, Sampling
from .config import ServeConfig
from .engine_host import EngineHost
from .errors import ApiError, error_body
from .metrics import CONTENT_TYPE, ServeMetrics

__all__ = ["OpenAIServer"]

log = logging.getLogger(__name__)


class OpenAIServer:
    """The endpoints over an EngineHost (which starts the engine in the background unless given one).
    ``close`` stops what the host started."""

    def __init__(self, config: ServeConfig, engine=None):
        self.config = config
        self.created = int(time.time())
        self.metrics = ServeMetrics(config.max_batch)
        self.host = EngineHost(config, self.metrics, engine)

    def close(self) -> None:
        self.host.close()

    async def wait_ready(self) -> dict[str, Any]:
        """Wait for the engine to start: ``{"state": "ready" | "failed", "error": reason or None}``."""
        with contextlib.suppress(ApiError):
            await self.host.ready()
        return {"state": self.host.state, "error": self.host.error}

    # -- the endpoints ----------------------------------------------------------------------------------
    async def handle(
        self, endpoint: str, request: Request, fn: Callable[[Request], Awaitable[Any]]
    ) -> Response:
        """Run ``fn`` for ``request``: key check, errors in the OpenAI shape, request metrics."""
        try:
            self._check_key(request)
            out = await fn(request)
            resp = out if isinstance(out, Response) else JSONResponse(out)
        except ApiError as e:
            resp = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except ZipMoEError as e:  # bad input the engine caught
            resp = JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)
        except Exception:
            log.exception("%s failed", endpoint)
            resp = JSONResponse(
                error_body("internal server error (logged on the server)", "server_error"), status_code=500
            )
        self.metrics.requests.labels(endpoint, str(resp.status_code)).inc()
        return resp

    async def models(self, request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, request: Request) -> dict[str, Any]:
        self._check_model(request.path_params.get("model", ""))
        return self._model_card()

    async def health(self) -> Response:
        state = self.host.state
        body = {"status": "ok" if state == "ready" else state}
        if state == "failed":
            body["error"] = self.host.error or "the generation thread stopped"
        return JSONResponse(body, status_code=200 if state == "ready" else 503)

    async def metrics_text(self) -> Response:
        stats = None
        if self.host.state != "ready":
            return Response(self.metrics.render(None), media_type=CONTENT_TYPE)
        waiting, _ = self.host.batcher.depth()
        self.metrics.queue_depth.set(waiting)
        try:
            stats = await asyncio.to_thread(self.host.engine.stats)
        except Exception as e:  # the engine's counters are left out of this scrape, the rest is served
            log.warning("engine stats unavailable: %s", e)
            stats = None
        return Response(self.metrics.render(stats), media_type=CONTENT_TYPE)

    async def completions(self, request: Request) -> Any:
        req: P.CompletionRequest = P.parse_body(await request.body(), P.CompletionRequest)
        self._check_model(req.model)
        texts = req.prompts()
        return await self._generate(
            req, lambda: [self._encode(p) for p in texts], req.max_tokens, "prompt", False
        )

    async def chat(self, request: Request) -> Any:
        req: P.ChatRequest = P.parse_body(await request.body(), P.ChatRequest)
        self._check_model(req.model)
        return await self._generate(req, lambda: [self._chat_ids(req)], req.limit, "messages", True)

    # -- helpers ------------------------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.config.name,
            "object": "model",
            "created": self.created,
            "owned_by": "zipmoe",
            "max_model_len": self.host.context,
        }

    def _check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send the server's --api-key as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    def _check_model(self, name: str) -> None:
        if name != self.config.name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist here; this server serves {self.config.name!r}",
                param="model",
                code="model_not_found",
            )

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.host.encode(prompt)
        else:
            ids = list(prompt)
            bad = [t for t in ids if t < 0 or (self.host.vocab is not None and t >= self.host.vocab)]
            if bad:
                raise ApiError.bad_request(
                    f"token id {bad[0]} is outside the vocabulary 0..{self.host.vocab - 1}", "prompt"
                )
        if not ids:
            raise ApiError.bad_request("the prompt is empty (it tokenizes to nothing)", "prompt")
        return ids

    def _chat_ids(self, req: P.ChatRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        with self.host.tok_lock:
            tok = self.host.tokenizer
            if not getattr(tok, "chat_template", None):
                raise ApiError.bad_request(
                    "this model's tokenizer has no chat template: use /v1/completions", "messages"
                )
            try:
                out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as e:  # a template that refuses these messages (e.g. the order of roles)
                raise ApiError.bad_request(
                    f"the chat template refused the messages: {e}", "messages"
                ) from None
        ids = out["input_ids"] if hasattr(out, "keys") else out
        ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
        if not ids:
            raise ApiError.bad_request("the messages tokenize to nothing", "messages")
        return ids

    def _limit(self, prompt: list[int], max_tokens: int | None, what: str) -> int:
        ctx = self.host.context
        if max_tokens is not None and max_tokens < 1:
            raise ApiError.bad_request(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if ctx is None:
            if max_tokens is None:
                raise ApiError.bad_request(
                    "give max_tokens (the model does not say its context)", "max_tokens"
                )
            return max_tokens
        want = ctx - len(prompt) if max_tokens is None else max_tokens
        if len(prompt) + max(want, 1) > ctx:
            raise ApiError.bad_request(
                f"this model's maximum context length is {ctx} tokens; the {what} has {len(prompt)} tokens and "
                f"max_tokens is {want if max_tokens is not None else 'unset'} ({len(prompt) + max(want, 1)} in all): "
                "shorten the prompt or lower max_tokens",
                "max_tokens" if max_tokens is not None else what,
            )
        return want

    async def _generate(self, req, make_prompts, max_tokens, what: str, chat: bool) -> Any:
        """Tokenize (``make_prompts``, once the engine and its tokenizer are up), check the context, queue
        the request, and answer it whole or as server-sent events."""
        batcher = await self.host.ready()
        prompts: list[list[int]] = make_prompts()
        limits = [self._limit(p, max_tokens, what) for p in prompts]
        rows = [p for p in prompts for _ in range(req.n)]
        row_limits = [m for m in limits for _ in range(req.n)]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(ev: tuple) -> None:  # from the batcher's thread
            loop.call_soon_threadsafe(events.put_nowait, ev)

        job = Job(
            rows,
            row_limits,
            Sampling.from_request(req.temperature, req.top_p, req.top_k, req.seed),
            sink,
            req.stops(),
        )
        batcher.submit(job)
        prompt_tokens = sum(len(p) for p in prompts)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            body = self._stream(batcher, job, events, rid, chat, prompt_tokens, req)
            return StreamingResponse(
                body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        texts, reasons, tokens = [""] * len(rows), ["length"] * len(rows), [[]] * len(rows)
        where: list[tuple] = [()] * len(rows)
        try:
            while True:
                ev = await events.get()
                if ev[0] == "delta":
                    texts[ev[1]] += ev[2]
                elif ev[0] == "finish":
                    reasons[ev[1]], tokens[ev[1]], where[ev[1]] = ev[2], ev[3], ev[4]
                elif ev[0] == "error":
                    raise ApiError(500, ev[1], type_="server_error")
                else:
                    break
        finally:
            batcher.cancel(job)  # a no-op unless the client went away (this task was cancelled)
        use = P.usage(prompt_tokens, sum(len(t) for t in tokens))
        build = P.chat_response if chat else P.completion_response
        out = build(rid, self.config.name, texts, reasons, use)
        if req.return_token_ids:
            for choice, ids, w in zip(out["choices"], tokens, where):
                choice.update(P.token_info(ids, w))
        return out

    async def _stream(
        self, batcher, job: Job, events: asyncio.Queue, rid, chat, prompt_tokens, req
    ) -> AsyncIterator[str]:
        model, created = self.config.name, int(time.time())
        tokens = [0] * len(job.prompts)

        def sse(doc: dict) -> str:
            return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"

        try:
            if chat:
                for i in range(len(job.prompts)):
                    yield sse(P.chat_chunk(rid, model, created, i, {"role": "assistant", "content": ""}))
            while True:
                ev = await events.get()
                kind = ev[0]
                if kind == "delta":
                    yield sse(
                        P.chat_chunk(rid, model, created, ev[1], {"content": ev[2]})
                        if chat
                        else P.completion_chunk(rid, model, created, ev[1], ev[2])
                    )
                elif kind == "finish":
                    tokens[ev[1]] = len(ev[3])
                    chunk = (
                        P.chat_chunk(rid, model, created, ev[1], {}, ev[2])
                        if chat
                        else P.completion_chunk(rid, model, created, ev[1], "", ev[2])
                    )
                    if req.return_token_ids:
                        chunk["choices"][0].update(P.token_info(ev[3], ev[4]))
                    yield sse(chunk)
                elif kind == "error":
                    yield sse(error_body(ev[1], "server_error"))
                    return
                else:
                    if req.include_usage:
                        use = P.usage(prompt_tokens, sum(tokens))
                        chunk = P.chat_chunk if chat else P.completion_chunk
                        yield sse(chunk(rid, model, created, use=use))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            batcher.cancel(job)  # a no-op when the stream ended; else the client went away
