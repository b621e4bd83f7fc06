"""The OpenAI request bodies zipmoe serves, validated strictly (a field of the wrong type is a 400 naming
it), and the response objects built from generated text.

Fields zipmoe cannot honour bit-exactly (penalties, logit bias, log-probabilities, tools, structured output,
echo, suffix, best_of) are refused with a 400 saying so rather than silently ignored; other unknown fields
(``user``, ``metadata``, ...) are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ApiError

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "parse_body",
    "token_info",
    "usage",
]

MAX_STOP = 4  # OpenAI's limit on stop sequences


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: float | None = (
        None  # OpenAI's default: 1.0; 0 is greedy (bit-identical to `zipmoe generate`)
    )
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's; as in vLLM: -1 or 0 disables it
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    return_token_ids: bool = False  # not OpenAI's (as in vLLM): each choice also gets its token ids

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError.bad_request(f"{name} is not supported (zipmoe keeps outputs bit-exact)", name)
        if self.logit_bias:
            raise ApiError.bad_request("logit_bias is not supported", "logit_bias")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ApiError.bad_request(
                f"temperature must be in [0, 2], got {self.temperature}", "temperature"
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ApiError.bad_request(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k is not None and self.top_k < -1:
            raise ApiError.bad_request(f"top_k must be -1, 0 or positive, got {self.top_k}", "top_k")
        if self.n < 1:
            raise ApiError.bad_request(f"n must be >= 1, got {self.n}", "n")
        stops = self.stops()
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ApiError.bad_request(f"stop takes up to {MAX_STOP} non-empty strings", "stop")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ApiError.bad_request("echo is not supported", "echo")
        if self.logprobs is not None:
            raise ApiError.bad_request("logprobs is not supported", "logprobs")
        if self.best_of not in (None, 1):
            raise ApiError.bad_request("best_of is not supported; use n", "best_of")
        if self.suffix:
            raise ApiError.bad_request("suffix is not supported", "suffix")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise ApiError.bad_request("prompt is empty", "prompt")
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError.bad_request(
                    f"content parts of type {part.type!r} are not supported (text only)", "messages"
                )
            parts.append(part.text)
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[Message]
    max_tokens: int | None = None  # default: the rest of the model's context
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if not self.messages:
            raise ApiError.bad_request("messages is empty", "messages")
        if self.logprobs or self.top_logprobs:
            raise ApiError.bad_request("logprobs is not supported", "logprobs")
        if self.tools:
            raise ApiError.bad_request("tools are not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError.bad_request("only the text response_format is supported", "response_format")

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_body(raw: bytes, model: type[_Strict]) -> Any:
    """The request body as ``model``; raises ApiError 400 for malformed JSON, a body that is not an object,
    a missing field or one of the wrong type (naming it), and for unsupported options."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError.bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ApiError.bad_request("the request body must be a JSON object")
    try:
        req = model.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if not isinstance(x, int) or len(err["loc"]) > 1]
        param = loc[0] if loc else None
        where = ".".join(str(x) for x in err["loc"])
        raise ApiError.bad_request(f"{where}: {err['msg']}", param) from None
    req.refuse_unsupported()
    return req


def token_info(ids: list[int], where: tuple) -> dict[str, Any]:
    """What ``return_token_ids`` adds to a choice: its token ids and the generation it ran in (batch id, row,
    rows), enough to check it against plain transformers on that same batch."""
    batch, row, size = where
    return {"token_ids": list(ids), "batch": {"id": batch, "row": row, "size": size}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _head(rid: str, obj: str, model: str, created: int | None) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model}


def completion_response(rid, model, texts, reasons, use, created=None) -> dict[str, Any]:
    choices = [
        {"index": i, "text": t, "logprobs": None, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons))
    ]
    return {**_head(rid, "text_completion", model, created), "choices": choices, "usage": use}


def completion_chunk(rid, model, created, index=None, text="", reason=None, use=None) -> dict[str, Any]:
    choices = (
        [] if index is None else [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]
    )
    out = {**_head(rid, "text_completion", model, created), "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def chat_response(rid, model, texts, reasons, use, created=None) -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons))
    ]
    return {**_head(rid, "chat.completion", model, created), "choices": choices, "usage": use}


def chat_chunk(rid, model, created, index=None, delta=None, reason=None, use=None) -> dict[str, Any]:
    choices = (
        []
        if index is None
        else [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": reason}]
    )
    out = {**_head(rid, "chat.completion.chunk", model, created), "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
