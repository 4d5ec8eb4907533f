"""From a request's raw body to a scheduler Request, off the event loop.

Parsing JSON, validating it, rendering the chat template and tokenizing all cost time in
proportion to the body, so none of it runs on the event loop (which must keep answering
`/health` and streams): `Preparer.submit` runs each body through `prepare` on one worker
thread of its own. One thread, because a fast tokenizer is not safe to share between threads,
and because limits.py bounds every step, so no body can hold that thread for long.

Checks come cheapest-first: JSON (no NaN/Infinity, bounded nesting and integers), the message
count, the schema, unsupported fields, characters before tokenizing, stop strings, and the
context window last (the only check that tokenizes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from chainlora.data import prompts
from chainlora.inference.engine import Engine
from chainlora.serve import budgets, catalog
from chainlora.serve.errors import ApiError
from chainlora.serve.limits import Limits
from chainlora.serve.scheduler import Request
from chainlora.serve.schema import ChatBody, CompletionBody, Sampling, refuse_unsupported
from chainlora.serve.settings import ServeSettings
from chainlora.serve.text import check_unicode

POLL_S = 0.05  # how often a waiting body's handler checks that its client is still there


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse(raw: bytes, model: type[BaseModel], limits: Limits) -> Any:
    """The body as `model`, or a 400 naming the first thing wrong with it."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "body: JSON nested too deeply", param="body", code="invalid_json")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, bad UTF-8, an integer of 4300+ digits
        raise ApiError(400, f"body: not valid JSON ({str(e)[:200]})", param="body", code="invalid_json")
    if not isinstance(data, dict):
        raise ApiError(400, "body: must be a JSON object", param="body", code="invalid_json")
    if isinstance(data.get("messages"), list):
        limits.messages(len(data["messages"]))
    limits.json_values(data)
    check_unicode(raw, data)  # a lone surrogate anywhere: a 400 naming its field, before anything reads it
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(400, f"{loc or 'body'}: {first.get('msg', 'invalid')}"[:500], param=loc or None)
    except RecursionError:
        raise ApiError(400, "body: nested too deeply", param="body")


class Preparer:
    """Turns bodies into scheduler Requests for one engine; see the module docstring.

    `settings` gives the limits, the default max_tokens and the deadline; `forwarding` (a
    backend answers) lets the fields only a backend implements through."""

    def __init__(self, engine: Engine, settings: ServeSettings, *, forwarding: bool = False):
        self.engine, self.settings, self.limits, self.forwarding = engine, settings, settings.limits, forwarding
        # the scheduler's thread tokenizes with padding, and a fast tokenizer's padding state is
        # not thread-safe: this thread has its own copy
        self.tok = copy.deepcopy(engine.tok)
        self.plain = prompts.UserText(self.tok)  # special-token strings in user text stay text
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chainlora-prepare")
        self.pending = 0  # bodies submitted and not yet prepared (the event loop's count)
        self.cancelled = 0  # dropped because their client left while they waited
        self.shed = 0  # refused with a 503: the queue was full

    async def submit(self, kind: str, raw: bytes,
                     gone: Callable[[], Awaitable[bool]] | None = None) -> tuple[Sampling, Request]:
        """The body and its Request, prepared on this preparer's own thread. At most
        `--max-prepare-queue` bodies wait for it (a 503 beyond), and a body whose client has
        gone (`gone()`) is dropped unprepared: abandoned bodies cannot build a backlog."""
        if self.pending >= self.settings.max_prepare_queue:
            self.shed += 1
            raise ApiError(503, f"server busy: {self.pending} requests are waiting to be prepared (chainlora serve "
                                "--max-prepare-queue); retry shortly", type="server_error", code="prepare_queue_full",
                           headers={"Retry-After": "1"})
        self.pending += 1
        job = self.pool.submit(self.prepare, kind, raw)
        try:
            return await self._wait(job, gone)
        finally:
            self.pending -= 1
            job.cancel()  # a no-op once it ran; drops it from the queue when the handler itself was cancelled

    async def _wait(self, job: concurrent.futures.Future, gone: Callable[[], Awaitable[bool]] | None) -> Any:
        """The job's result, checking every POLL_S whether the client is still there."""
        future = asyncio.wrap_future(job)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, so never logged as lost
        while not future.done():
            await asyncio.wait({future}, timeout=POLL_S)
            if not future.done() and gone is not None and await gone():
                self.cancelled += 1  # still queued: never prepared; running: its result is dropped
                raise ApiError(499, "client disconnected", code="cancelled")
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def prepare(self, kind: str, raw: bytes) -> tuple[Sampling, list[Request]]:
        """The body and its Requests: one for a chat, one per prompt for a completion."""
        body = parse(raw, ChatBody if kind == "chat" else CompletionBody, self.limits)
        refuse_unsupported(body, forwarding=self.forwarding)
        return body, ([self.chat(body)] if kind == "chat" else self.completions(body))

    # ------------------------------------------------------------------ per kind

    def chat(self, body: ChatBody) -> Request:
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        self.limits.prompt(sum(len(m["content"]) for m in msgs), "messages")
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if not users or not users[-1].strip():
            raise ApiError(400, "messages: needs a non-empty user message", param="messages")
        plain = [{**m, "content": self.plain(m["content"])} for m in msgs]  # rendered, never read
        try:
            if len(msgs) == 1 or (len(msgs) == 2 and msgs[0]["role"] == "system"):
                sys_text = plain[0]["content"] if len(msgs) == 2 else self.engine.system
                rendered = prompts.render(self.tok, plain[-1]["content"], sys_text)  # exactly as in training
            else:
                rendered = prompts.render_chat(self.tok, plain, self.engine.system)
        except Exception as e:  # the model's chat template refuses this conversation (jinja raises)
            raise ApiError(400, f"messages: the model's chat template refuses them: {str(e)[:200]}", param="messages")
        return self.request(body, users[-1], rendered, "messages")

    def completions(self, body: CompletionBody) -> list[Request]:
        """One Request per prompt (OpenAI's four prompt shapes), each its own choice."""
        p = body.prompt
        several = isinstance(p, list) and bool(p) and not isinstance(p[0], int)
        prompts_: list = list(p) if several else [p]
        self.limits.prompts(len(prompts_))
        if several and body.stream:
            raise ApiError(400, "stream: send one prompt per streamed request", param="stream")
        if body.echo and body.stream:
            raise ApiError(400, "echo: not with stream (send stream: false to have the prompt scored)", param="echo")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens: 0 only with echo (to score the prompt)", param="max_tokens")
        self.limits.prompt(sum(len(x) for x in prompts_ if isinstance(x, str)), "prompt")
        return [self.completion(body, x, f"prompt[{i}]" if several else "prompt") for i, x in enumerate(prompts_)]

    def completion(self, body: CompletionBody, prompt: str | list[int], field: str) -> Request:
        """A text prompt is answered in the chat template, as the adapters were trained, unless it
        is echoed: then it is the model's input as written (what echo returns and scores)."""
        if isinstance(prompt, list):
            return self.token_prompt(body, prompt, field)
        if not prompt.strip():
            raise ApiError(400, f"{field}: empty", param=field)
        if body.echo:
            return self.request(body, prompt, prompts.ids(self.tok, prompt), field, echo=prompt)
        try:
            rendered = prompts.render(self.tok, self.plain(prompt), self.engine.system)
        except Exception as e:
            raise ApiError(400, f"{field}: the model's chat template refuses it: {str(e)[:200]}", param=field)
        return self.request(body, prompt, rendered, field)

    def token_prompt(self, body: CompletionBody, ids: list[int], field: str) -> Request:
        """A prompt sent as token ids is the model's input verbatim (no BOS added, no template):
        what lm-evaluation-harness sends, and what a chainlora front forwarding here rendered.
        `chain` routes it by its last user message when it is in the chat template, else by its
        decoded text (prompts.token_prompt_text)."""
        if not ids:
            raise ApiError(400, f"{field}: empty", param=field)
        vocab = len(self.tok)
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"{field}: token ids must lie in [0, {vocab})", param=field)
        text = prompts.token_prompt_text(self.tok, ids, self.engine.system)
        echo = self.tok.decode(ids) if body.echo else None
        return self.request(body, text, list(ids), field, echo=echo)

    # ------------------------------------------------------------------ shared

    def max_tokens(self, body: Sampling) -> int:
        """What the body asks for (a 400 over `--max-tokens`), or the server's default."""
        asked = getattr(body, "max_completion_tokens", None)
        return budgets.max_tokens(asked or body.max_tokens, "max_completion_tokens" if asked else "max_tokens",
                                  self.settings)

    def fits(self, n: int, body: Sampling, field: str) -> None:
        """A 400 for a prompt of `n` tokens over the token budget (budgets.py), or that leaves no
        room for its max_tokens (the engine's check)."""
        budgets.check_prompt(n, self.settings, self.engine.context, field)
        if why := self.engine.overflow(n, self.max_tokens(body)):
            raise ApiError(400, f"{field}: {why}; shorten it or lower max_tokens", param=field,
                           code="context_length_exceeded")

    def request(self, body: Sampling, text: str, rendered: str | list[int], field: str,
                echo: str | None = None) -> Request:
        task = catalog.pin(self.engine, body.model)  # an unknown model is a 404 whatever else is wrong
        if body.n != 1:
            raise ApiError(400, "n: only n=1 is supported", param="n")
        self.limits.stops(body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else [])
        most = self.max_tokens(body)  # over the ceiling: refused before tokenizing
        if body.min_tokens and body.min_tokens > most:
            raise ApiError(400, f"min_tokens: {body.min_tokens} is more than max_tokens ({most})", param="min_tokens")
        top, scored = logprobs_asked(body)
        if not isinstance(rendered, list):  # tokenized here once: the worker and a backend get ids
            rendered = self.plain.ids(rendered)  # user text's special-token strings as plain text
        self.fits(len(rendered), body, field)
        return Request(text=text, rendered=rendered, task=task, max_tokens=most,
                       temperature=body.temperature, top_p=body.top_p, stop=body.stops(), seed=body.seed,
                       deadline=time.monotonic() + self.settings.timeout_s, logprobs=top,
                       prompt_logprobs=top if scored else None, echo=echo,
                       min_tokens=most if body.ignore_eos else body.min_tokens or 0)


def logprobs_asked(body: Sampling) -> tuple[int | None, bool]:
    """(top-k of each generated token's logprobs, None: not asked; whether the prompt is scored
    too). Chat: `logprobs: true` with `top_logprobs` (which needs it); completions: `logprobs`
    0-5, the prompt scored when it is echoed."""
    if isinstance(body, ChatBody):
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs", code="unsupported_parameter")
        return (body.top_logprobs or 0) if body.logprobs else None, False
    k = getattr(body, "logprobs", None)
    return k, k is not None and bool(getattr(body, "echo", False))
