"""`chainlora serve`: its options (defaults and choices from chainlora.serve.settings) and how the
API key is read."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from chainlora.errors import ChainloraError
from chainlora.serve.limits import Limits
from chainlora.serve.settings import ADAPTER_TIERS, BACKENDS, DEFAULTS as D, ServeSettings


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, --api-key or $CHAINLORA_API_KEY (one way only)."""
    if args.api_key_file and args.api_key:
        raise ChainloraError("serve: give the key one way: --api-key-file or --api-key, not both")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ChainloraError(f"{args.api_key_file}: cannot read the API key file ({e.__class__.__name__})")
        if not key or any(c.isspace() for c in key):
            raise ChainloraError(f"{args.api_key_file}: the API key file must hold one key, no spaces")
        return key
    if args.api_key:
        print("chainlora: warning: a key given with --api-key shows in `ps` and shell history; "
              "prefer --api-key-file or CHAINLORA_API_KEY", file=sys.stderr)
        return args.api_key
    return os.environ.get("CHAINLORA_API_KEY") or None


def _limits(args: argparse.Namespace) -> Limits:
    """The `limits` flag group as serve's Limits (a value <= 0 is a user error naming its flag)."""
    try:
        return Limits(max_body_bytes=int(args.max_body_mb * (1 << 20)), max_json_values=args.max_json_values,
                      max_messages=args.max_messages, max_prompts=args.max_prompts,
                      max_prompt_chars=args.max_prompt_chars,
                      max_stops=args.max_stops, max_stop_chars=args.max_stop_chars,
                      header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                      keep_alive_s=args.keep_alive, max_connections=args.max_connections,
                      max_connections_per_client=args.max_connections_per_client,
                      max_unauthenticated_connections=args.max_unauthenticated_connections,
                      write_timeout_s=args.write_timeout)
    except ValueError as e:
        raise ChainloraError(str(e))


def settings(args: argparse.Namespace) -> ServeSettings:
    """The parsed flags as ServeSettings (whose defaults the flags show)."""
    return ServeSettings(
        host=args.host, port=args.port, api_key=_api_key(args), device=args.device, dtype=args.dtype,
        selector=args.selector, threshold=args.threshold, novelty=not args.no_novelty, gate=not args.no_gate,
        max_batch=args.max_batch, window_ms=args.window_ms, max_queue=args.max_queue, timeout_s=args.timeout,
        max_adapters=args.max_adapters, cpu_cache_mb=args.cpu_cache_mb, adapters=args.adapters,
        backend=args.backend, backend_url=args.backend_url,
        backend_key=args.backend_key or os.environ.get("CHAINLORA_BACKEND_KEY"),
        backend_base_model=args.backend_base_model, backend_cache_prompt=args.backend_cache_prompt, limits=_limits(args), **_budgets(args), **_browser(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from chainlora.serve.app import serve

    serve(args.library, settings(args))
    return 0


def add_serve_parser(sub: argparse._SubParsersAction, selector_args: Callable) -> None:
    d = sub.add_parser("serve", help="an OpenAI-compatible server that routes each request to its adapter")
    d.add_argument("library", help="adapter library directory")
    d.add_argument("--host", default=D.host)
    d.add_argument("--port", type=int, default=D.port)
    d.add_argument("--api-key-file", help="require `Authorization: Bearer KEY`, the key read from this file")
    d.add_argument("--api-key", help="the key itself (shows in `ps`: prefer --api-key-file or $CHAINLORA_API_KEY)")
    selector_args(d)
    d.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    d.add_argument("--dtype", default=D.dtype)
    d.add_argument("--max-batch", type=int, default=D.max_batch, help="requests per generate call")
    d.add_argument("--window-ms", type=float, default=D.window_ms, help="how long a batch waits for company")
    d.add_argument("--max-queue", type=int, default=D.max_queue, help="waiting requests before 429")
    d.add_argument("--timeout", type=float, default=D.timeout_s, help="seconds a request may take")
    d.add_argument("--max-adapters", type=int, help="task adapters resident at once (LRU beyond)")
    d.add_argument("--cpu-cache-mb", type=float, default=D.cpu_cache_mb, help="host-memory tier for evicted adapters")
    d.add_argument("--adapters", default=D.adapters, choices=ADAPTER_TIERS,
                   help="device tier that answers: pool (slot tensors, one batched matmul a layer) or peft")
    d.add_argument("--backend", default=D.backend, choices=BACKENDS,
                   help="local (default), openai (vLLM) or llamacpp (llama-server): route here, answer at --backend-url")
    d.add_argument("--backend-url", help="OpenAI-compatible server with the adapters, e.g. vLLM's http://host:8000/v1")
    d.add_argument("--backend-key", help="API key for the backend (default: $CHAINLORA_BACKEND_KEY)")
    d.add_argument("--backend-base-model", help="the backend's name for the bare base model (fallback rows)")
    d.add_argument("--backend-cache-prompt", action="store_true",
                   help="llamacpp: let llama-server reuse each slot's cached prompt (safe only when its host-memory "
                        "prompt cache is off, as the export's llama-server.sh starts it; see docs/export.md)")
    _limit_args(d)
    _budget_args(d)
    _browser_args(d)
    d.set_defaults(func=cmd_serve)


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list of names (hosts, origins) as a tuple, blanks dropped."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _browser(args: argparse.Namespace) -> dict:
    """The `browsers` flag group as ServeSettings keywords."""
    return {"allowed_hosts": _names(args.allowed_hosts), "cors_origins": _names(args.cors_origins)}


def _browser_args(d: argparse.ArgumentParser) -> None:
    """The `browsers` flag group (serve/browser.py), defaults ServeSettings'."""
    b = d.add_argument_group("browsers (what a web page may do; docs/serving.md: Security)")
    b.add_argument("--allowed-hosts", default=",".join(D.allowed_hosts),
                   help="Host names answered besides IP addresses and localhost, comma-separated (.example.com: "
                        "its subdomains too; *: any). Default: none without a key, any with one")
    b.add_argument("--cors-origins", default=",".join(D.cors_origins),
                   help="web origins whose pages may call the server (https://app.example.com), comma-separated "
                        "(*: any). Default: none, only pages this server serves")


def _budgets(args: argparse.Namespace) -> dict:
    """The `token budgets` flag group as ServeSettings keywords."""
    return {"max_tokens": args.max_tokens, "max_prompt_tokens": args.max_prompt_tokens,
            "max_batch_tokens": args.max_batch_tokens, "prefill_chunk": args.prefill_chunk,
            "max_prepare_queue": args.max_prepare_queue}


def _budget_args(d: argparse.ArgumentParser) -> None:
    """The `token budgets` flag group (vLLM's max_model_len / max_num_batched_tokens), defaults ServeSettings'."""
    b = d.add_argument_group("token budgets (a refusal is a 400/503 naming its option; docs/serving.md: Security)")
    b.add_argument("--max-tokens", type=int, default=D.max_tokens,
                   help="the most max_tokens a request may ask for (default: %(default)s)")
    b.add_argument("--max-prompt-tokens", type=int, default=D.max_prompt_tokens,
                   help="a prompt's tokens after the chat template (default: the model's context)")
    b.add_argument("--max-batch-tokens", type=int, default=D.max_batch_tokens,
                   help="prompt tokens in one batch, rows x longest prompt; also caps one prompt (default: %(default)s)")
    b.add_argument("--prefill-chunk", type=int, default=D.prefill_chunk,
                   help="prompt positions per prefill step; deadlines and disconnects are checked between "
                        "steps (default: %(default)s)")
    b.add_argument("--max-prepare-queue", type=int, default=D.max_prepare_queue,
                   help="bodies waiting to be parsed and tokenized before a 503 (default: %(default)s)")


def _limit_args(d: argparse.ArgumentParser) -> None:
    """The `limits` flag group, its defaults Limits' own."""
    L = D.limits
    lim = d.add_argument_group("limits (each refusal is a 400/408/413/503 naming its option; docs/serving.md: Security)")
    lim.add_argument("--max-body-mb", type=float, default=L.max_body_bytes / (1 << 20),
                     help="request body size (default: %(default)s)")
    lim.add_argument("--max-json-values", type=int, default=L.max_json_values,
                     help="JSON values (objects, arrays, strings, numbers) in a body (default: %(default)s)")
    lim.add_argument("--max-messages", type=int, default=L.max_messages, help="messages per chat request (default: %(default)s)")
    lim.add_argument("--max-prompts", type=int, default=L.max_prompts,
                     help="prompts in one /v1/completions request, each its own choice (default: %(default)s)")
    lim.add_argument("--max-prompt-chars", type=int, default=L.max_prompt_chars, help="prompt characters, checked before tokenizing (default: %(default)s)")
    lim.add_argument("--max-stops", type=int, default=L.max_stops, help="stop sequences per request (default: %(default)s)")
    lim.add_argument("--max-stop-chars", type=int, default=L.max_stop_chars, help="characters per stop sequence (default: %(default)s)")
    lim.add_argument("--header-timeout", type=float, default=L.header_timeout_s, help="seconds for a request's headers (default: %(default)s)")
    lim.add_argument("--body-timeout", type=float, default=L.body_timeout_s, help="seconds for a request's whole body (default: %(default)s)")
    lim.add_argument("--keep-alive", type=float, default=L.keep_alive_s, help="seconds an idle connection stays open (default: %(default)s)")
    lim.add_argument("--max-connections", type=int, default=L.max_connections, help="open connections at once (503 beyond) (default: %(default)s)")
    lim.add_argument("--max-connections-per-client", type=int, default=L.max_connections_per_client,
                     help="open connections from one remote address; behind a proxy, raise it to --max-connections "
                          "(default: %(default)s)")
    lim.add_argument("--max-unauthenticated-connections", type=int, default=L.max_unauthenticated_connections,
                     help="open connections without a valid key (or not through their headers yet); past it the "
                          "oldest idle one is closed (default: %(default)s)")
    lim.add_argument("--write-timeout", type=float, default=L.write_timeout_s,
                     help="seconds a client may read nothing of its response before it is cut off "
                          "(default: %(default)s)")
