"""Connections: what uvicorn's h11 protocol lacks for a server on a network.

uvicorn closes an idle kept-alive connection (`timeout_keep_alive`) and caps the size of a
request's headers (h11, 16 KB), but a client that sends half its headers and then waits is
held forever, and `limit_concurrency` only answers 503 once a request's headers are complete,
so sockets that never finish them pile up. This protocol adds:
- a header deadline: a request's headers must be complete within `header_timeout_s` of the
  connection opening or of the previous response ending (408, then the connection closes);
- admission (`admit`): caps on open connections in all, from one remote address, and without
  a valid API key (a connection counts as that until its headers bring the key; in no-key mode
  until its headers are complete). A cap passed closes an idle connection without a key
  (`oldest_idle`: of the address that holds the most, a half-sent request head first), never
  one with the key nor one just opened (GRACE_S: its request is on the way), so sockets that
  never finish their headers cannot starve clients that do. With nothing to close, the
  newcomer gets a 503, except under the budget without a key, which is looked at again once
  the newcomer is GRACE_S old (by then a real client has sent its key);
- a write deadline: a client that reads nothing of its response for `write_timeout_s` (the
  buffers full, a stream stalled) is cut off, so its request and connection are let go;
- its own protocol errors (malformed HTTP, oversized headers) in OpenAI's JSON shape, with
  real reason phrases and their headers (`Retry-After`), and uvicorn's per-request warnings
  rate-limited.
The body's pace is the ASGI guard's (guard.py); everything else is uvicorn's.
"""

from __future__ import annotations

import asyncio
import errno
import http
import json
import os
import socket
import time
from collections import Counter
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from chainlora.errors import ChainloraError
from chainlora.serve.errors import ApiError, Quiet
from chainlora.serve.guard import authorized
from chainlora.serve.limits import Limits

QUIET = Quiet()  # the connections this layer closes
UVICORN = Quiet(prefix="")  # uvicorn's own warnings (malformed HTTP, unsupported upgrades), once per request
PEEK = 1 << 14  # bytes looked at in the kernel for a whole request head (h11 allows 16 KB)
GRACE_S = 0.1  # a new connection's time to send anything before it may be closed to make room


def raw_response(error: ApiError) -> bytes:
    """A whole HTTP/1.1 error response, for a connection with no request cycle to send it."""
    body = json.dumps(error.body()).encode()
    try:
        reason = http.HTTPStatus(error.status).phrase
    except ValueError:
        reason = "Error"
    kept = "".join(f"{k.lower()}: {v}\r\n" for k, v in error.headers.items()
                   if k.lower() not in ("connection", "content-length", "content-type"))
    head = (f"HTTP/1.1 {error.status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{kept}connection: close\r\n\r\n")
    return head.encode() + body


class QuietLog:
    """uvicorn's logger for one connection with its warnings rate-limited (UVICORN): it warns
    once per malformed request or WebSocket upgrade, which a flood turns into a flood of lines."""

    def __init__(self, logger: Any):
        self.logger = logger

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        UVICORN.warn(self.logger, msg % args if args else msg)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.logger, name)


def too_many(what: str, flag: str, cap: int, *, closed: bool = False) -> ApiError:
    """The 503 for a connection over a cap: refused, or closed to make room for another."""
    how = "connection closed to make room" if closed else "too many connections"
    return ApiError(503, f"{how}: more than {cap} open connections{what} (chainlora serve {flag}); retry shortly",
                    type="server_error", code="too_many_connections", headers={"Retry-After": "1"})


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, admission caps and a write deadline."""

    header_timeout_s: float = Limits.header_timeout_s
    max_connections: int = Limits.max_connections
    max_per_client: int = Limits.max_connections_per_client
    max_unauthenticated: int = Limits.max_unauthenticated_connections
    write_timeout_s: float = Limits.write_timeout_s
    api_key: str | None = None  # the key a request's headers must bring to count as authenticated

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.logger = QuietLog(self.logger)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._waiting_since_cycle: Any = None
        self.trusted, self.served, self.opened = False, 0, time.monotonic()
        self.since = self.opened  # idle since (the last response, or the opening)
        self.address = self.client[0] if self.client else "local"
        refusal = admit(self)
        if refusal is not None:
            self._close_with(refusal)
            return
        self._arm()

    # ------------------------------------------------------------------ admission (see admit)

    def idle(self) -> bool:
        """No request in progress: waiting for a request's headers, or kept alive between requests."""
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

    def partial(self) -> bool:
        """Whether part of a request head came and the rest has not (what a slow client does)."""
        return bool(self.conn.trailing_data[0])

    def request_waiting(self) -> bool:
        """Whether a whole request head already waits in the kernel, unread: a client that sent
        its headers at once (only not yet read), never a slow one, so never the one to close."""
        sock = self.transport.get_extra_info("socket")
        try:
            with socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno())) as s:
                return b"\r\n\r\n" in s.recv(PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (OSError, AttributeError):
            return False

    def evict(self, what: str, flag: str, cap: int) -> None:
        self._close_with(too_many(what, flag, cap, closed=True))

    # ------------------------------------------------------------------ deadlines

    def _arm(self) -> None:
        self._disarm()
        self._waiting_since_cycle = self.cycle  # headers are late until a cycle other than this one starts
        self._timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if self.cycle is self._waiting_since_cycle and not self.transport.is_closing():
            self._close_with(ApiError(408, f"headers: not received within {self.header_timeout_s:g} s "
                                           "(chainlora serve --header-timeout)", code="request_timeout"))

    def _close_with(self, error: ApiError) -> None:
        QUIET.warn(self.logger, error.message)
        self.transport.write(raw_response(error))
        self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._timer is not None and self.cycle is not self._waiting_since_cycle:
            self._disarm()  # a new request's headers are complete
            self.trusted = authorized(self.api_key, self.headers)

    def on_response_complete(self) -> None:
        self.served, self.since = self.served + 1, time.monotonic()  # idle since now
        if not self.transport.is_closing():
            self._arm()  # before uvicorn reads a pipelined request, which may disarm it again
        super().on_response_complete()

    def pause_writing(self) -> None:  # the transport's buffer is full: the client is not reading
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_late)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_write_timer()

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_late(self) -> None:
        """Cut off a client that read nothing for write_timeout_s: uvicorn then tells the app it
        disconnected (a stream's row is cancelled) and the buffered response is dropped."""
        self._write_timer = None
        QUIET.warn(self.logger, f"the client read nothing of its response for {self.write_timeout_s:g} s "
                                "(chainlora serve --write-timeout)")
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_write_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:  # malformed HTTP or headers over h11's limit
        self._close_with(ApiError(400, f"{msg.rstrip('.')}: malformed HTTP or headers too large", code="bad_http"))


def open_connections(new: GuardedH11) -> list[GuardedH11]:
    """The server's connections that are not closing (the new one included)."""
    return [c for c in new.connections if isinstance(c, GuardedH11) and not c.transport.is_closing()]


def oldest_idle(candidates: list[GuardedH11]) -> GuardedH11 | None:
    """The connection to close to make room, among idle ones: of the address holding the most;
    one that never completed a request before one that did (a kept-alive prober); one stuck in
    the middle of its headers before one that sent nothing; the oldest first. Never one that
    sent nothing yet and is younger than GRACE_S (a client that just connected: its request is
    on the way), nor one whose whole request already waits to be read."""
    now = time.monotonic()
    idle = [c for c in candidates if c.idle() and (c.served or c.partial() or now - c.opened >= GRACE_S)]
    per_address = Counter(c.address for c in idle)
    for c in sorted(idle, key=lambda c: (-per_address[c.address], c.served > 0, not c.partial(), c.since)):
        if not c.request_waiting():
            return c
    return None


UNAUTHENTICATED = " without a valid API key", "--max-unauthenticated-connections"


def caps(new: GuardedH11) -> list[tuple[Any, int, str, str]]:
    """(who counts, cap, what, flag) for each cap a new connection must fit, in this order."""
    return [(lambda c: c.address == new.address, new.max_per_client, " from one address",
             "--max-connections-per-client"),
            (lambda c: not c.trusted, new.max_unauthenticated, *UNAUTHENTICATED),
            (lambda c: True, new.max_connections, "", "--max-connections")]


def admit(new: GuardedH11) -> ApiError | None:
    """Room for `new` under each cap in turn (its address's share, the connections without a
    valid key, all connections), made by closing an idle connection without the key; or the
    503 for `new` when a cap is full of connections that have the key, are busy or are new.
    The budget without a key is looked at again when `new` is GRACE_S old (`recheck`): a
    client gets that long to bring its key before it counts against the budget itself."""
    for member, cap, what, flag in caps(new):
        members = [c for c in open_connections(new) if member(c)]
        if len(members) <= cap:
            continue
        victim = oldest_idle([c for c in members if c is not new and not c.trusted])
        if victim is not None:
            victim.evict(what, flag, cap)
        elif (what, flag) == UNAUTHENTICATED:
            new.loop.call_later(GRACE_S * 1.05, recheck, new)
        else:
            return too_many(what, flag, cap)
    return None


def recheck(new: GuardedH11) -> None:
    """Close a connection without the key (`new` itself, if it still has none) while there are
    more than their budget."""
    members = [c for c in open_connections(new) if not c.trusted]
    if not new.transport.is_closing() and len(members) > new.max_unauthenticated:
        victim = oldest_idle(members)
        if victim is not None:
            victim.evict(*UNAUTHENTICATED, new.max_unauthenticated)


def protocol(limits: Limits, api_key: str | None = None) -> type[GuardedH11]:
    """The protocol class uvicorn instantiates per connection, set to these limits and key."""
    return type("ChainloraH11", (GuardedH11,), {
        "header_timeout_s": limits.header_timeout_s, "max_connections": limits.max_connections,
        "max_per_client": limits.max_connections_per_client,
        "max_unauthenticated": limits.max_unauthenticated_connections,
        "write_timeout_s": limits.write_timeout_s, "api_key": api_key})


def api_key_of(app: Any) -> str | None:
    """The key a chainlora app (app.create_app) checks; None for any other ASGI app."""
    return getattr(getattr(getattr(app, "state", None), "server", None), "api_key", None)


def uvicorn_config(app: Any, limits: Limits, **kw: Any) -> Any:
    """uvicorn's Config with the limits it knows itself (keep-alive), our protocol (which reads
    the app's key: connections without it count as unauthenticated), and no WebSocket
    upgrades (the server has no WebSocket routes: an upgrade would skip the guard)."""
    import uvicorn

    return uvicorn.Config(app, http=protocol(limits, api_key_of(app)), ws="none",
                          timeout_keep_alive=limits.keep_alive_s, **kw)


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken BEFORE the model loads: a port in use or a host that does not
    resolve is one line and exit 2 at once, not an uvicorn error after the load. The socket is
    handed to uvicorn as it is (no second bind, so nothing can take the port in between)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        raise ChainloraError(f"--host {host} --port {port}: cannot listen there ({getattr(e, 'strerror', None) or e})")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a TIME_WAIT port is free
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        hint = "; choose another --port or stop what uses it" if e.errno == errno.EADDRINUSE else ""
        raise ChainloraError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}){hint}")
    return sock
