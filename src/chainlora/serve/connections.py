"""Connections: what uvicorn's h11 protocol lacks for a server on a network.

uvicorn closes an idle kept-alive connection (`timeout_keep_alive`) and caps the size of a
request's headers (h11, 16 KB), but a client that sends half its headers and then waits is
held forever, and `limit_concurrency` only answers 503 once a request's headers are complete,
so sockets that never finish them pile up. This protocol adds:
- a header deadline: a request's headers must be complete within `header_timeout_s` of the
  connection opening or of the previous response ending (408, then the connection closes);
- a connection cap: past `max_connections` open sockets a new one gets a 503 and is closed;
- its own protocol errors (malformed HTTP, oversized headers) in OpenAI's JSON shape.
The body's pace is the ASGI guard's (guard.py); everything else is uvicorn's.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from chainlora.errors import ChainloraError
from chainlora.serve.limits import Limits
from chainlora.serve.errors import ApiError


class Quiet:
    """At most one log line per `every` seconds, with how many it stood for: a flood of bad
    connections must not become a flood of log lines (or a full disk)."""

    def __init__(self, every: float = 10.0):
        self.every, self.last, self.skipped = every, float("-inf"), 0

    def warn(self, logger: Any, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.skipped += 1
            return
        more = f" (and {self.skipped} more like it since the last line)" if self.skipped else ""
        logger.warning("closing a connection: %s%s", message, more)
        self.last, self.skipped = now, 0


QUIET = Quiet()


def raw_response(error: ApiError) -> bytes:
    """A whole HTTP/1.1 error response, for a connection with no request cycle to send it."""
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {error.status} {'Request Timeout' if error.status == 408 else 'Error'}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap."""

    header_timeout_s: float = Limits.header_timeout_s
    max_connections: int = Limits.max_connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_since_cycle: Any = None
        if len(self.connections) > self.max_connections:
            self._close_with(ApiError(503, f"too many connections (the server's limit is {self.max_connections}: "
                                           "chainlora serve --max-connections); retry shortly",
                                      type="server_error", code="too_many_connections", headers={"Retry-After": "1"}))
            return
        self._arm()

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

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # before uvicorn reads a pipelined request, which may disarm it again
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:  # malformed HTTP or headers over h11's limit
        self._close_with(ApiError(400, f"{msg.rstrip('.')}: malformed HTTP or headers too large", code="bad_http"))


def protocol(limits: Limits) -> type[GuardedH11]:
    """The protocol class uvicorn instantiates per connection, set to these limits."""
    return type("ChainloraH11", (GuardedH11,), {"header_timeout_s": limits.header_timeout_s,
                                                 "max_connections": limits.max_connections})


def uvicorn_config(app: Any, limits: Limits, **kw: Any) -> Any:
    """uvicorn's Config with the limits it knows itself (keep-alive), our protocol, and no
    WebSocket upgrades (the server has no WebSocket routes: an upgrade would skip the guard)."""
    import uvicorn

    return uvicorn.Config(app, http=protocol(limits), ws="none", timeout_keep_alive=limits.keep_alive_s, **kw)


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
