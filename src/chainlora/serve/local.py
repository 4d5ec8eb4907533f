"""Answering on this server's own chain: a prepared Request goes on the scheduler's queue, and
its Answer (or, streaming, its routing decision and text as they come) comes back to the event
loop. The scheduler's outcomes become OpenAI errors here; responses.py shapes the answers.

A client that leaves cancels its row (it stops at the next prefill chunk or token), and no
request waits past its deadline plus a backstop: the worker resolves every request by its
deadline, so the backstop only fires on a bug, and then with a 503 rather than a request held
forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from chainlora.errors import ChainloraError, NotFound
from chainlora.inference.engine import Answer
from chainlora.serve import responses
from chainlora.serve.errors import ApiError
from chainlora.serve.scheduler import QueueFull, Request, TimedOut, deliver
from chainlora.serve.schema import Sampling

if TYPE_CHECKING:
    from chainlora.serve.server import Server

BACKSTOP_S = 30.0  # seconds past a request's deadline before the handler gives up on the worker


def _no_answer() -> ApiError:
    return ApiError(503, "timed out: no answer in time", type="server_error", code="timeout")


def submit(server: Server, req: Request) -> None:
    """Queue the request, or a 429 when the queue is full."""
    try:
        server.scheduler.submit(req)
    except QueueFull as e:
        server.metrics.rejected.inc()
        raise ApiError(429, f"server busy: {e}; retry shortly", type="rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"})


def result(future: asyncio.Future) -> Answer:
    """The worker's outcome for one request: its Answer, or the OpenAI error that says why not."""
    try:
        return future.result()
    except TimedOut as e:
        raise ApiError(503, f"timed out: {e}", type="server_error", code="timeout", headers={"Retry-After": "1"})
    except NotFound as e:  # its task or adapter left the library (a reload) while it waited
        raise ApiError(404, str(e), param="model", code="model_not_found")
    except ChainloraError as e:  # e.g. its adapter's file is corrupt: names the adapter
        raise ApiError(500, str(e), type="server_error")
    except asyncio.CancelledError:
        raise ApiError(499, "the request was cancelled", type="server_error", code="cancelled")
    except Exception as e:  # a bug: logged by the scheduler; the client still gets JSON
        raise ApiError(500, f"internal error: {e.__class__.__name__}: {e}", type="server_error")


async def run(server: Server, req: Request, is_disconnected: Callable[[], Awaitable[bool]]) -> Answer:
    """Queue the request and wait for its answer; a client that leaves cancels it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    req.done = deliver(loop, future)
    submit(server, req)
    give_up = req.deadline + BACKSTOP_S
    try:
        while not future.done():
            await asyncio.wait({future}, timeout=0.25)
            if not future.done() and (await is_disconnected() or time.monotonic() > give_up):
                req.cancelled.set()
                if time.monotonic() > give_up:
                    raise _no_answer()
    except asyncio.CancelledError:  # the handler itself was cancelled: stop the row too
        req.cancelled.set()
        raise
    return result(future)


async def run_all(server: Server, reqs: list[Request], is_disconnected: Callable[[], Awaitable[bool]]) -> list[Answer]:
    """Queue every prompt's request at once (they batch across adapters) and wait for all; the
    first failure fails the response and cancels the rest."""
    tasks = [asyncio.ensure_future(run(server, r, is_disconnected)) for r in reqs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for r, t in zip(reqs, tasks):
            if not t.done():
                r.cancelled.set()
                t.cancel()


async def answer(server: Server, request: Any, reqs: list[Request], body: Sampling, kind: str, t0: float) -> Any:
    """The whole completion as one JSON body (a choice per prompt), or a stream of chunks when
    the body asks for one (one prompt)."""
    if body.stream:
        return stream(server, reqs[0], body, kind, t0)
    answers = await run_all(server, reqs, request.is_disconnected)
    for a in answers:
        server.metrics.done(kind, a, time.monotonic() - t0)
    return responses.completion(kind, body.model, answers, reqs, server.vocab)


# --------------------------------------------------------------------------- streaming


def stream(server: Server, req: Request, body: Sampling, kind: str, t0: float) -> Any:
    """Queue the request with hooks that pass its route and text to the event loop; queued
    before the response starts, so a full queue is still a 429."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    future: asyncio.Future = loop.create_future()
    req.on_route = lambda r: loop.call_soon_threadsafe(events.put_nowait, ("route", r))
    req.on_text = lambda t, lp, n: loop.call_soon_threadsafe(events.put_nowait, ("text", (t, lp, n)))
    req.done = deliver(loop, future)
    future.add_done_callback(lambda f: events.put_nowait(("done", None)))
    submit(server, req)
    return responses.event_stream(_chunks(server, req, events, future, body, kind, t0))


async def _worker_events(req: Request, events: asyncio.Queue) -> AsyncIterator[tuple[str, Any]]:
    """("route", Route) then ("text", delta)s until the worker is done; past the backstop the
    row is cancelled and the stream gets a 503."""
    give_up = req.deadline + BACKSTOP_S
    while True:
        try:
            what, value = await asyncio.wait_for(events.get(), max(give_up - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            req.cancelled.set()
            raise _no_answer()
        if what == "done":
            return
        yield what, value


def continuous_usage(body: Sampling) -> bool:
    """vLLM's `stream_options.continuous_usage_stats`: token counts in every chunk."""
    return bool(body.stream_options and body.stream_options.continuous_usage_stats)


async def _chunks(server: Server, req: Request, events: asyncio.Queue, future: asyncio.Future,
                  body: Sampling, kind: str, t0: float) -> AsyncIterator[str]:
    """The stream's chunks; an error becomes one error event, and [DONE] always comes last."""
    out = responses.Chunks(kind, body.model, responses.completion_id(kind), server.vocab, req.logprobs,
                           prompt_tokens=len(req.rendered) if continuous_usage(body) else None)
    route = None
    try:
        try:
            async for what, value in _worker_events(req, events):
                if what == "route":
                    route = value
                    if kind == "chat":
                        yield out.role(route)
                else:
                    yield out.text(route, *value)
            a = result(future)
        except ApiError as e:  # an error event, then the end of the stream as always
            yield responses.error_event(e)
            yield responses.DONE
            return
        server.metrics.done(kind, a, time.monotonic() - t0)
        yield out.last(route, a)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield out.usage(route, a)
        yield responses.DONE
    finally:
        if not future.done():
            req.cancelled.set()  # the client went away: its row stops at the next token
