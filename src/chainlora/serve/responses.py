"""Every OpenAI response body and stream chunk the server sends, answered here or forwarded.

Local answers (local.py) are built from an engine `Answer`; forwarded ones (forward.py) are a
backend's text completion reshaped into what the client asked for (chat or completion). Both
carry the routing decision in the extra `chainlora` field, and every stream ends with [DONE].
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from chainlora.inference.engine import Answer, Route
from chainlora.inference.logprobs import TokenLogprob
from chainlora.serve import logprob_fields
from chainlora.serve.errors import ApiError
from chainlora.serve.logprob_fields import FLOOR, Vocab
from chainlora.serve.scheduler import Request

DONE = "data: [DONE]\n\n"
OBJECTS = {"chat": "chat.completion", "text": "text_completion"}
CHUNK_OBJECTS = {"chat": "chat.completion.chunk", "text": "text_completion"}


# --------------------------------------------------------------------------- pieces


def route_field(route: Route | None) -> dict | None:
    return None if route is None else route.as_dict()


def usage(a: Answer) -> dict:
    return {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens}


def finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def completion_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def sse(data: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def error_event(error: ApiError) -> str:
    """A stream's error: one event in OpenAI's error shape (the caller then sends DONE)."""
    return sse(error.body())


def backend_error(message: str) -> dict[str, Any]:
    """The error body for a backend that failed or answered nonsense."""
    return ApiError(502, message, type="server_error", code="backend_error").body()


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, never cached or buffered by a proxy."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------- answered here


def logprobs_of(kind: str, vocab: Vocab, a: Answer, req: Request) -> dict | None:
    """A choice's `logprobs` field: None unless the request asked."""
    if req.logprobs is None:
        return None
    if kind == "chat":
        return logprob_fields.chat(vocab, a, req.logprobs)
    prompt = (a.prompt_ids or [], a.prompt_logprobs or []) if req.echo is not None else None
    return logprob_fields.completion(vocab, a.logprobs or [], req.logprobs, prompt)


def choice(kind: str, index: int, a: Answer, req: Request, vocab: Vocab) -> dict:
    """One choice; a completion's carries its own route (each prompt is routed on its own)."""
    if kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": a.text},
                "finish_reason": finish(a.finish_reason), "logprobs": logprobs_of(kind, vocab, a, req)}
    return {"index": index, "text": (req.echo or "") + a.text, "finish_reason": finish(a.finish_reason),
            "logprobs": logprobs_of(kind, vocab, a, req), "chainlora": route_field(a.route)}


def completion(kind: str, model: str, answers: list[Answer], reqs: list[Request], vocab: Vocab) -> dict:
    """A whole (non-streaming) chat completion or text completion: a choice per prompt, the
    usage summed, and the top-level `chainlora` field the first choice's route."""
    choices = [choice(kind, i, a, r, vocab) for i, (a, r) in enumerate(zip(answers, reqs))]
    total = {k: sum(usage(a)[k] for a in answers) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"id": completion_id(kind), "object": OBJECTS[kind], "created": int(time.time()), "model": model,
            "choices": choices, "usage": total, "chainlora": route_field(answers[0].route)}


@dataclass
class Chunks:
    """The chunks of one local stream; each repeats its id, object, created time and model.
    `logprobs` (the request's top-k, None: not asked) adds each delta's tokens' entries."""

    kind: str
    model: str
    id: str
    vocab: Vocab | None = None
    logprobs: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    offset: int = 0  # a completion stream's text_offset so far
    prompt_tokens: int | None = None  # set: every chunk carries usage so far (vLLM's continuous_usage_stats)
    made: int = 0  # completion tokens so far

    def head(self) -> dict:
        return {"id": self.id, "object": CHUNK_OBJECTS[self.kind], "created": self.created, "model": self.model}

    def chunk(self, route: Route | None, delta: dict | str, reason: str | None = None, lp: dict | None = None) -> str:
        key = "delta" if self.kind == "chat" else "text"
        choice = {"index": 0, key: delta, "finish_reason": reason, "logprobs": lp}
        extra = {} if self.prompt_tokens is None else {"usage": self._usage(self.prompt_tokens, self.made)}
        return sse({**self.head(), "choices": [choice], **extra, "chainlora": route_field(route)})

    @staticmethod
    def _usage(prompt: int, made: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}

    def role(self, route: Route | None) -> str:
        """A chat stream's first chunk, once routed: the assistant role, as OpenAI's is."""
        return self.chunk(route, {"role": "assistant", "content": ""})

    def text(self, route: Route | None, text: str, entries: list[TokenLogprob] = (), made: int | None = None) -> str:
        self.made = self.made if made is None else made
        return self.chunk(route, {"content": text} if self.kind == "chat" else text, lp=self._logprobs(entries))

    def _logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if self.logprobs is None or self.vocab is None:
            return None
        if self.kind == "chat":
            return {"content": logprob_fields.chat_content(self.vocab, entries, self.logprobs), "refusal": None}
        lp = logprob_fields.completion(self.vocab, entries, self.logprobs)
        lp["text_offset"] = [self.offset + o for o in lp["text_offset"]]
        self.offset += sum(len(t) for t in lp["tokens"])
        return lp

    def last(self, route: Route | None, a: Answer) -> str:
        """The chunk with the finish reason (and no text)."""
        self.made = a.completion_tokens
        return self.chunk(route, {} if self.kind == "chat" else "", finish(a.finish_reason))

    def usage(self, route: Route | None, a: Answer) -> str:
        """`stream_options.include_usage`: a chunk with no choices and the token counts."""
        return sse({**self.head(), "choices": [], "usage": usage(a), "chainlora": route_field(route)})


# --------------------------------------------------------------------------- forwarded


def _as_chat(data: dict, obj: str) -> dict:
    """A backend's completion id and object as a chat completion's."""
    return {**data, "id": "chatcmpl-" + str(data.get("id", "")).removeprefix("cmpl-"), "object": obj}


def chat_logprobs(lp: Any) -> dict | None:
    """A backend's completion `logprobs` (tokens, token_logprobs, top_logprobs dicts) as chat's."""
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
        return None

    def item(token: Any, value: Any) -> dict:
        return {"token": str(token), "logprob": value, "bytes": list(str(token).encode("utf-8", "replace"))}

    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    return {"content": [{**item(t, v), "top_logprobs": [item(k, x) for k, x in sorted(
                (top or {}).items(), key=lambda kv: -(kv[1] if isinstance(kv[1], (int, float)) else FLOOR))]}
                        for t, v, top in zip(lp["tokens"], lp.get("token_logprobs") or [], tops)],
            "refusal": None}


def reply(data: Any, kind: str, model: str, route: dict | None) -> Any:
    """The backend's text completion as the client asked for it (`kind` chat or text)."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return data
    data = {**data, "model": model, "chainlora": route}
    if kind == "chat":
        data = _as_chat(data, "chat.completion")
        data["choices"] = [{"index": c.get("index", 0), "finish_reason": c.get("finish_reason"),
                            "logprobs": chat_logprobs(c.get("logprobs")),
                            "message": {"role": "assistant", "content": c.get("text") or ""}}
                           for c in data["choices"] if isinstance(c, dict)]
    return data


def forwarded(status: int, data: Any, kind: str, model: str, route: dict | None) -> JSONResponse:
    """The backend's answer: reshaped when it is one (200), passed on as it is when an error."""
    return JSONResponse(reply(data, kind, model, route) if status == 200 else data, status_code=status)


def chunks(data: dict, kind: str, model: str, route: dict | None, started: set) -> list[dict]:
    """One backend stream chunk as the client's chunks; a chat stream's first chunk of each
    choice carries the assistant role, as OpenAI's does (`started`: the choices that had it)."""
    data = {**data, "model": model, "chainlora": route}
    if kind != "chat":
        return [data]
    data = _as_chat(data, "chat.completion.chunk")
    out, choices = [], []
    for c in data.get("choices") or []:
        i = c.get("index", 0)
        if i not in started:
            started.add(i)
            out.append({**data, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None, "logprobs": None}]})
        text = c.get("text") or ""
        choices.append({"index": i, "delta": {"content": text} if text else {},
                        "finish_reason": c.get("finish_reason"), "logprobs": chat_logprobs(c.get("logprobs"))})
    if choices or not out:  # a usage-only chunk (choices: []) goes on as it is
        out.append({**data, "choices": choices})
    return out
