"""`chainlora serve`'s settings: every option and its default, written once.

The CLI takes its flags' defaults and `choices` from here, `Server` its queue, timing and key,
and `serve()` the rest (where to listen, how to load the engine, which backend answers). A
Python caller passes a `ServeSettings`, or keywords that replace its fields
(`Server(engine, max_batch=4)`). Light on purpose: the CLI imports it to build its parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from chainlora.errors import ChainloraError
from chainlora.inference.engine import ADAPTER_TIERS
from chainlora.serve.limits import Limits

BACKENDS = ("local", "openai", "llamacpp")  # who answers; a new one also goes in app.forwarder_for
NEEDS_URL = {"openai": "--backend openai needs --backend-url URL (e.g. http://vllm-host:8000/v1)",
             "llamacpp": "--backend llamacpp needs --backend-url URL (llama-server, e.g. http://127.0.0.1:8080)"}


@dataclass(frozen=True)
class ServeSettings:
    """One server's options (the `chainlora serve` flag of each in its comment)."""

    host: str = "127.0.0.1"  # --host
    port: int = 8000  # --port (0: the system picks one)
    api_key: str | None = None  # --api-key-file / --api-key / $CHAINLORA_API_KEY ("" is none)
    # --allowed-hosts: Host names answered besides IP addresses and localhost ("*": any; with a
    # key and none given: any, the key protects); --cors-origins: web origins whose pages may
    # call the server ("*": any). Browser rules: serve/browser.py
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    device: str | None = None  # --device (None: the best available)
    dtype: str = "float32"  # --dtype
    selector: str | None = None  # --selector (None: the library's measured choice)
    threshold: float | None = None  # --threshold (None: the calibrated one)
    novelty: bool = True  # not --no-novelty
    gate: bool = True  # not --no-gate
    max_batch: int = 16  # --max-batch: requests per generate call
    window_ms: float = 10.0  # --window-ms: how long a batch waits for company
    max_queue: int = 256  # --max-queue: waiting requests before a 429
    timeout_s: float = 300.0  # --timeout: seconds a request may take (and a backend call)
    default_max_tokens: int = 256  # a request's max_tokens when it sends none
    max_tokens: int = 4096  # --max-tokens: the most max_tokens a request may ask for (400 beyond)
    max_prompt_tokens: int | None = None  # --max-prompt-tokens: a prompt's tokens (None: the model's context)
    max_batch_tokens: int = 8192  # --max-batch-tokens: padded prompt tokens in one batch (rows x longest)
    prefill_chunk: int = 512  # --prefill-chunk: prompt positions per prefill step (checks between steps)
    max_prepare_queue: int = 64  # --max-prepare-queue: bodies waiting to be parsed / tokenized (503 beyond)
    max_adapters: int | None = None  # --max-adapters: task adapters resident at once
    cpu_cache_mb: float = 1024  # --cpu-cache-mb: host-memory tier for evicted adapters
    adapters: str = "pool"  # --adapters: the device tier that answers (ADAPTER_TIERS)
    backend: str = "local"  # --backend (BACKENDS)
    backend_url: str | None = None  # --backend-url
    backend_key: str | None = None  # --backend-key / $CHAINLORA_BACKEND_KEY
    backend_base_model: str | None = None  # --backend-base-model
    backend_cache_prompt: bool = False  # --backend-cache-prompt: llama-server keeps each slot's prompt cache
    limits: Limits = field(default_factory=Limits)  # --max-body-mb ... --max-connections (limits.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_key", self.api_key or None)
        if self.max_queue < 1 or self.timeout_s <= 0 or self.max_batch < 1:
            raise ChainloraError("serve: --max-queue and --max-batch must be >= 1, --timeout > 0")
        if self.backend not in BACKENDS:
            raise ChainloraError(f"--backend: unknown {self.backend!r} (use {', '.join(BACKENDS[:-1])} or "
                                 f"{BACKENDS[-1]})")
        if self.backend in NEEDS_URL and not self.backend_url:
            raise ChainloraError(NEEDS_URL[self.backend])
        if self.backend_cache_prompt and self.backend != "llamacpp":
            raise ChainloraError("--backend-cache-prompt: only for --backend llamacpp")
        _check_budgets(self)
        for name in ("allowed_hosts", "cors_origins"):  # one name given as a string would be split into letters
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value or ()))

    @classmethod
    def of(cls, settings: ServeSettings | None = None, **options: Any) -> ServeSettings:
        """`settings` (default: all defaults) with `options` replacing its fields: how keyword
        callers of `Server` and `serve()` are read."""
        return replace(settings or cls(), **options)


BUDGETS = {"max_tokens": "--max-tokens", "max_prompt_tokens": "--max-prompt-tokens",
           "max_batch_tokens": "--max-batch-tokens", "prefill_chunk": "--prefill-chunk",
           "max_prepare_queue": "--max-prepare-queue", "default_max_tokens": "default_max_tokens"}


def _check_budgets(s: ServeSettings) -> None:
    """Every token budget and queue size is a whole number >= 1 (None: the model's context)."""
    for name, flag in BUDGETS.items():
        value = getattr(s, name)
        if value is None and name == "max_prompt_tokens":
            continue
        if not isinstance(value, int) or value < 1:
            raise ChainloraError(f"serve: {flag} must be a whole number >= 1 (got {value!r})")


DEFAULTS = ServeSettings()
__all__ = ["ADAPTER_TIERS", "BACKENDS", "DEFAULTS", "ServeSettings"]
