"""What one request may cost the server, checked before any expensive work.

Each limit is a `chainlora serve` option with the default below, and each refusal is an
OpenAI-shaped 400/413 that names the limit and its option. The order of checks follows the
cost of the work each protects: the body's size before it is read (guard.py), the number of
messages before they are validated, characters before tokenizing, stop strings before they
reach the model's thread (where matching costs memory and time by their length).
"""

from __future__ import annotations

from dataclasses import dataclass

from chainlora.serve.errors import ApiError


OPTIONS = {"max_body_bytes": "--max-body-mb", "max_json_values": "--max-json-values", "max_messages": "--max-messages",
           "max_prompts": "--max-prompts", "max_prompt_chars": "--max-prompt-chars",
           "max_stops": "--max-stops", "max_stop_chars": "--max-stop-chars", "header_timeout_s": "--header-timeout",
           "body_timeout_s": "--body-timeout", "keep_alive_s": "--keep-alive", "max_connections": "--max-connections",
           "max_connections_per_client": "--max-connections-per-client",
           "max_unauthenticated_connections": "--max-unauthenticated-connections", "write_timeout_s": "--write-timeout"}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # --max-body-mb 1: JSON parsing holds the GIL, so it stalls the loop
    max_json_values: int = 20_000  # --max-json-values: objects, arrays, strings and numbers in a body
    max_messages: int = 256  # --max-messages
    max_prompts: int = 64  # --max-prompts: prompts in one /v1/completions request (each its own choice)
    max_prompt_chars: int = 100_000  # --max-prompt-chars, all messages' text together
    max_stops: int = 4  # --max-stops (OpenAI's own limit)
    max_stop_chars: int = 64  # --max-stop-chars, each stop string
    header_timeout_s: float = 10.0  # --header-timeout: a request's headers must arrive within it
    body_timeout_s: float = 30.0  # --body-timeout: its whole body within it after the headers
    keep_alive_s: float = 5.0  # --keep-alive: an idle connection is closed after it
    max_connections: int = 128  # --max-connections: open connections at once
    max_connections_per_client: int = 64  # --max-connections-per-client: one remote address's share of them
    # --max-unauthenticated-connections: connections without a valid key (or not yet through their
    # headers) at once; past it the oldest idle one is closed (connections.py)
    max_unauthenticated_connections: int = 32
    write_timeout_s: float = 30.0  # --write-timeout: a client that reads nothing of its response for this long

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"serve: {OPTIONS[name]} must be > 0 (got {value})")

    def json_values(self, data: object) -> None:
        """Count the body's JSON values before validating it: pydantic validates in one call that
        holds the GIL (a 4 MB body of 160,000 content parts took 0.8 s, the event loop stalled
        meanwhile); this walk is plain Python, which yields the GIL as it goes."""
        stack, n = [data], 0
        while stack:
            item = stack.pop()
            n += 1
            if n > self.max_json_values:
                raise ApiError(400, f"body: more than {self.max_json_values} JSON values (chainlora serve "
                                    "--max-json-values)", param="body", code="request_too_large")
            if isinstance(item, dict):
                stack.extend(item.values())
                n += len(item)  # the keys
            elif isinstance(item, list):
                stack.extend(item)

    def messages(self, n: int) -> None:
        if n > self.max_messages:
            raise ApiError(400, f"messages: {n} messages exceed the server's limit of {self.max_messages} "
                                "(chainlora serve --max-messages)", param="messages", code="too_many_messages")

    def prompts(self, n: int) -> None:
        if n > self.max_prompts:
            raise ApiError(400, f"prompt: {n} prompts exceed the server's limit of {self.max_prompts} "
                                "(chainlora serve --max-prompts)", param="prompt", code="too_many_prompts")

    def prompt(self, chars: int, field: str) -> None:
        if chars > self.max_prompt_chars:
            raise ApiError(400, f"{field}: {chars} characters exceed the server's limit of {self.max_prompt_chars} "
                                "(chainlora serve --max-prompt-chars)", param=field, code="context_length_exceeded")

    def stops(self, stops: tuple[str, ...]) -> None:
        if len(stops) > self.max_stops:
            raise ApiError(400, f"stop: {len(stops)} stop sequences exceed the limit of {self.max_stops} "
                                "(chainlora serve --max-stops)", param="stop", code="too_many_stops")
        for s in stops:
            if len(s) > self.max_stop_chars:
                raise ApiError(400, f"stop: a stop sequence of {len(s)} characters exceeds the limit of "
                                    f"{self.max_stop_chars} (chainlora serve --max-stop-chars)",
                               param="stop", code="stop_too_long")
