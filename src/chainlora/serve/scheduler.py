"""Window batching for the server: concurrent requests become ONE mixed-adapter generate call.

Requests wait in a bounded queue. A single worker thread owns the engine: it takes the first
waiting request, collects more for up to `window_ms` (or until `max_batch`), groups them by
sampling settings (temperature, top_p, stop strings, seed — one `generate` call shares those), routes
the unpinned rows of a group in one selector pass and answers the group in one generate call,
every row with its own adapter and its own max_tokens.

Why a window and not continuous batching: transformers' `generate` runs a batch to its end and
PEFT's mixed-adapter forward fixes each row's adapter for the call, so joining rows mid-flight
would need our own decode loop and KV-cache slot manager — that is what vLLM is for, and
`chainlora serve --backend openai` fronts it. Within a batch, a row that is done (its own
max_tokens, end of answer, client gone, deadline passed) is marked finished by a stopping
criterion, and the call ends when every row is — a disconnected client never holds a batch.
Streaming rows get their text through `BatchStreamer`, which sees the whole batch each step.

Work is bounded by tokens (budgets.py): a batch holds at most `max_batch_tokens` padded prompt
tokens (the request that would pass it waits, first in line), and prompts are prefilled
`prefill_chunk` positions at a time (inference/prefill.py). A request whose client left or
whose deadline passed is answered at once wherever it is — waiting in the queue, between two
prefill chunks (it leaves the batch, its cache rows freed) or in decode (its row is finished) —
and the rest of its batch goes on; `SchedulerStats` counts each by stage.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from chainlora.errors import ChainloraError
from chainlora.inference.engine import Answer, Engine, Route
from chainlora.inference.logprobs import Recorder
from chainlora.inference.stops import end_ids
from chainlora.serve.streamer import BatchStreamer

log = logging.getLogger("chainlora.serve")


class QueueFull(Exception):
    """The bounded queue has no room: the client should retry later."""


class TimedOut(Exception):
    """The request's deadline passed before it could start."""


@dataclass
class Request:
    """One completion request as the scheduler sees it."""

    text: str  # what the selector reads (the instruction / last user message)
    rendered: str | list[int]  # the model's input (chat template applied), or its token ids
    task: str | None  # a pinned adapter, or None to route
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # sampling seed: rows share one generate call only with the same seed
    deadline: float = float("inf")  # time.monotonic() by which it must be done
    logprobs: int | None = None  # each generated token's logprob and this many alternatives (None: not asked)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (OpenAI's echo)
    echo: str | None = None  # the prompt's text, when the response repeats it (completions' echo)
    min_tokens: int = 0  # no end token before this many (vLLM's min_tokens; ignore_eos: max_tokens)
    on_route: Callable[[Route], None] | None = None  # called (worker thread) once routed
    on_text: Callable[[str, list, int], None] | None = None  # streaming (worker thread): per delta, its logprob
    # entries and the tokens made so far
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: Callable[[Answer | None, BaseException | None], None] | None = None
    enqueued: float = field(default_factory=time.monotonic)

    def key(self) -> tuple:
        return (self.temperature, self.top_p, self.stop, self.seed)


def deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> Callable:
    """A `done` callback resolving an asyncio future from the worker thread."""

    def done(answer: Answer | None, error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(answer)

        loop.call_soon_threadsafe(settle)

    return done


class RowStopper:
    """StoppingCriteria: a row is finished at its own max_tokens, or when its client left or
    its deadline passed — and then `cut` answers it at once (cancelled, or a 503 timeout), not
    when the whole batch ends; generate stops when every row is finished. `rows`: the batch's
    rows (indices into `requests`) still in the call, after a chunked prefill dropped some."""

    def __init__(self, requests: list[Request], cut: Callable[[Request, str], bool], ends: set[int]):
        self.requests, self.cut_row, self.ends = requests, cut, ends
        self.rows = list(range(len(requests)))
        self.cut: set[int] = set()  # rows answered here (indices into `requests`)
        self.start: int | None = None  # padded prompt length, seen at the first check
        self.steps: list[float] = []  # when each decoding step's tokens were made (time.monotonic)

    def select(self, rows: list[int]) -> None:
        self.rows = list(rows)

    def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
        import torch

        self.steps.append(time.monotonic())
        if self.start is None:
            self.start = input_ids.shape[1] - 1  # checked after each new token
        made = input_ids.shape[1] - self.start
        last = input_ids[:, -1].tolist()
        return torch.tensor([self._done(i, made, last[j]) for j, i in enumerate(self.rows)], dtype=torch.bool,
                            device=input_ids.device)

    def _done(self, i: int, made: int, last: int) -> bool:
        """Whether row i is finished; a row that ended on its own (its last token an end token)
        is never cut: its answer is whole."""
        r = self.requests[i]
        if i in self.cut or made >= r.max_tokens or last in self.ends:
            return True
        if self.cut_row(r, "decode"):
            self.cut.add(i)
            return True
        return False


@dataclass
class SchedulerStats:
    batches: int = 0
    requests: int = 0
    completion_tokens: int = 0
    busy_seconds: float = 0.0
    cancelled: int = 0  # rows whose client left (or handler was cancelled) mid-generation
    cancelled_at: dict[str, int] = field(default_factory=dict)  # by stage: queue, prefill, decode
    timed_out_at: dict[str, int] = field(default_factory=dict)  # the same, for deadlines passed

    def count(self, what: dict[str, int], stage: str) -> None:
        what[stage] = what.get(stage, 0) + 1


class Scheduler:
    """The bounded queue and the one worker thread that runs the engine."""

    def __init__(self, engine: Engine, *, max_batch: int, window_ms: float, max_queue: int,  # settings.py
                 on_batch: Callable[[list[Request], list[Answer], float], None] | None = None,
                 max_batch_tokens: int | None = None, prefill_chunk: int | None = None):
        """max_batch_tokens: the padded prompt tokens (rows x longest prompt) one batch may hold
        (None: no limit); prefill_chunk: prompt positions per prefill step (None: one step)."""
        self.engine, self.max_batch, self.window = engine, max_batch, window_ms / 1000
        self.max_batch_tokens, self.prefill_chunk = max_batch_tokens, prefill_chunk
        self.held: Request | None = None  # taken from the queue but over a batch's budget: first in the next
        self.queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queue)
        self.on_batch = on_batch
        self.stats = SchedulerStats()
        self.active = 0  # requests in the generate call now running
        self.thread = threading.Thread(target=self._work, name="chainlora-scheduler", daemon=True)
        self.running = True
        self.thread.start()

    def submit(self, request: Request) -> None:
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are waiting")

    def close(self) -> None:
        """Stop the worker; requests still waiting get an error instead of silence."""
        self.running = False
        held, self.held = self.held, None
        if held is not None and held.done:
            held.done(None, TimedOut("the server is shutting down"))
        while True:
            try:
                r = self.queue.get_nowait()
            except queue.Empty:
                break
            if r is not None and r.done:
                r.done(None, TimedOut("the server is shutting down"))
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self.thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return self.queue.qsize() + (self.held is not None)

    # ------------------------------------------------------------------ the worker

    def _collect(self) -> list[Request]:
        """The next batch: the first waiting request and what joins it within the window, up to
        max_batch rows and max_batch_tokens padded prompt tokens (the one that would pass the
        budget waits, first in line for the next batch)."""
        first, self.held = self.held or self.queue.get(), None
        if first is None:
            return []
        batch, until, width = [first], time.monotonic() + self.window, _tokens(first)
        while len(batch) < self.max_batch:
            left = until - time.monotonic()
            try:
                item = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.running = False
                break
            if self.max_batch_tokens and (len(batch) + 1) * max(width, _tokens(item)) > self.max_batch_tokens:
                self.held = item
                break
            batch.append(item)
            width = max(width, _tokens(item))
        return batch

    def _work(self) -> None:
        while self.running:
            try:
                self._once()
            except Exception:  # never let the worker die: every request would hang
                log.exception("scheduler loop error")

    def _once(self) -> None:
        if self.running:
            live = [r for r in self._collect() if not self.cut(r, "queue")]
            groups: dict[tuple, list[Request]] = {}
            for r in live:
                groups.setdefault(r.key(), []).append(r)
            for group in groups.values():
                self.active = len(group)
                try:
                    self._run(group)
                finally:
                    self.active = 0

    def _run(self, group: list[Request]) -> None:
        t0 = time.monotonic()
        try:
            group, routes = self._admit(group)
            if not group:
                return
            try:
                answers, streamer, steps = self._generate(group, routes)
            except ChainloraError:  # the library changed since staging (a reload): check each row again
                kept, routes = self._readable(group, routes)
                if len(kept) == len(group):
                    raise  # not one row's fault: the whole batch gets the error
                group = kept
                if not group:
                    return
                answers, streamer, steps = self._generate(group, routes)
        except ChainloraError as e:
            for r in group:
                r.done and r.done(None, e)
            return
        except Exception as e:  # a bug: every waiting client gets an error, the server lives on
            log.exception("generation failed for a batch of %d", len(group))
            for r in group:
                r.done and r.done(None, e)
            return
        seconds = time.monotonic() - t0
        self.stats.batches += 1
        self.stats.requests += len(group)
        self.stats.busy_seconds += seconds
        answered = [(i, r, a) for i, (r, a) in enumerate(zip(group, answers)) if a is not None]  # None: cut
        self.stats.completion_tokens += sum(a.completion_tokens for _, _, a in answered)
        for i, r, a in answered:
            if r.cancelled.is_set():  # after the last check: nobody reads it
                a.finish_reason = "cancelled"
                self.stats.cancelled += 1
            if streamer is not None:
                streamer.finish(i, a)
            r.done and r.done(a, None)
        if self.on_batch is not None and answered:
            self.on_batch([r for _, r, _ in answered], [a for _, _, a in answered], seconds, steps)

    def cut(self, r: Request, stage: str) -> bool:
        """Answer a request no longer wanted now — its client left (cancelled) or its deadline
        passed (a 503 timeout) — wherever it is: waiting in the queue, in prefill or in decode.
        True when it was; counted by stage."""
        if r.cancelled.is_set():
            self.stats.count(self.stats.cancelled_at, stage)
            self.stats.cancelled += stage != "queue"
            error: BaseException = asyncio.CancelledError()
        elif time.monotonic() > r.deadline:
            self.stats.count(self.stats.timed_out_at, stage)
            error = TimedOut("the request waited past its timeout" if stage == "queue"
                             else f"the request passed its timeout during {stage}")
        else:
            return False
        _fail(r, error)
        return True

    # ------------------------------------------------------------------ per-row faults

    def _admit(self, group: list[Request]) -> tuple[list[Request], list[Route]]:
        """Route the group and stage its adapters. A row whose pinned task is gone, whose
        adapter is missing or corrupt, or (when the selector itself fails) that needed routing,
        gets its own error now; the rest go on to the one generate call."""
        live = [r for r in group if r.task is None or self._ok(r, lambda: self.engine.check_task(r.task))]
        try:
            routes = self.engine.routes_for([r.text for r in live], [r.task for r in live])
        except ChainloraError as e:
            pinned = [r for r in live if r.task is not None]
            if not pinned or len(pinned) == len(live):
                raise
            for r in live:
                if r.task is None:
                    _fail(r, e)
            live = pinned
            routes = self.engine.routes_for([r.text for r in live], [r.task for r in live])
        live, routes = self._readable(live, routes)
        for r, route in zip(live, routes):
            if r.on_route is not None:
                r.on_route(route)
        return live, routes

    def _readable(self, group: list[Request], routes: list[Route]) -> tuple[list[Request], list[Route]]:
        """The rows whose adapter can be read now; the others get that adapter's error."""
        bad = self.engine.stage([route.adapter for route in routes])
        kept = [(r, route) for r, route in zip(group, routes)
                if route.adapter not in bad or _fail(r, bad[route.adapter])]
        return [r for r, _ in kept], [route for _, route in kept]

    @staticmethod
    def _ok(r: Request, check: Callable[[], Any]) -> bool:
        try:
            check()
            return True
        except ChainloraError as e:
            return _fail(r, e)

    def _generate(self, group: list[Request], routes: list[Route]) -> tuple[list[Answer | None], BatchStreamer | None,
                                                                            list[float]]:
        """One generate call for the group; a row cut on the way (prefill or decode) is None.
        Also when each decoding step's tokens were made (every row makes its k-th token at step k)."""
        asked = {i: r.logprobs for i, r in enumerate(group) if r.logprobs is not None}
        recorder = Recorder(asked, len(group)) if asked else None
        streamer = BatchStreamer(self.engine.tok, group, recorder) if any(r.on_text for r in group) else None
        stopper = RowStopper(group, self.cut, end_ids(self.engine.tok))

        def keep(rows: list[int]) -> list[int]:  # asked between prefill chunks
            kept = [i for i in rows if not self.cut(group[i], "prefill")]
            for view in (stopper, streamer):
                view is not None and view.select(kept)
            return kept

        first = group[0]
        if first.seed is not None and first.temperature > 0:  # best effort, as OpenAI's: the same
            import torch  # request in the same company samples the same answer

            torch.manual_seed(first.seed)
        answers = self.engine.generate(
            [r.text for r in group], routes=routes, rendered=[r.rendered for r in group],
            max_new_tokens=[r.max_tokens for r in group], temperature=first.temperature,
            top_p=first.top_p, stop=list(first.stop) or None, streamer=streamer, stopping=stopper,
            prefill_chunk=self.prefill_chunk, keep=keep, recorder=recorder,
            prompt_logprobs=[r.prompt_logprobs for r in group], min_tokens=[r.min_tokens for r in group])
        return [None if i in stopper.cut else a for i, a in enumerate(answers)], streamer, stopper.steps


def _tokens(r: Request) -> int:
    """A request's prompt tokens (a prompt still in text counts its characters, never fewer)."""
    return len(r.rendered)


def _fail(r: Request, error: BaseException) -> bool:
    """Answer one row with its error; False, so that filters drop it."""
    if r.done is not None:
        r.done(None, error)
    return False
