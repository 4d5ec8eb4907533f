"""`chainlora serve --backend llamacpp`: route here, answer on a llama.cpp server (llama-server).

llama-server runs the library exported by `chainlora export --format gguf` with every adapter
loaded and none applied (`OUT/llama-server.sh`: `--lora a.gguf --lora b.gguf ...
--lora-init-without-apply`). Each request then names its adapter in llama-server's per-request
`lora` field, a list of {id, scale}: EVERY loaded adapter is listed with an explicit scale (1
for the routed one, 0 for the rest; all 0 for a request that falls back to the base model),
because llama.cpp versions differ in what an unlisted adapter does (scale 0, or the server's
own scale). The ids come from llama-server's `GET /lora-adapters`, matched by file name
(`adapters/<name>.gguf`), read once and checked against the library's adapters.

The prompt cache. llama-server (llama.cpp as vendored by llama-cpp-python 0.3.36) clears a
slot's cached prompt when the slot's adapter scales change (`launch_slot_with_task`), so a slot
never reuses a prefix computed under another adapter; but its host-memory prompt cache
(`--cache-ram`, 8 GiB by default) restores a saved prompt into a slot by token overlap alone
(`server_prompt_cache::load`), whichever adapter computed it, and the slot then keeps it when
its own adapter matches: answers changed (measured: 70 of 80 equal with that cache and
`cache_prompt: true`, 80 of 80 with `--cache-ram 0`; bench/RESULTS.md). So requests send
`cache_prompt: false` (every prompt recomputed), unless `--backend-cache-prompt` says the
server runs with `--cache-ram 0`, as the export's llama-server.sh starts it: then `true`.

Everything else is `forward.Forwarder`'s: the chat template and system prompt applied here and
token ids sent to `/v1/completions`, the answer in the shape the client asked for with the
routing field, streams that always end with [DONE]. llama-server never batches two different
adapter settings in one step (its slots take turns), unlike chainlora's own mixed-adapter batches.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import PurePath
from typing import Any, AsyncIterator, Sequence

from chainlora.errors import ChainloraError
from chainlora.inference.engine import BASE, Route
from chainlora.serve import responses
from chainlora.serve.forward import Forwarder
from chainlora.serve.responses import backend_error


class LlamaCppForwarder(Forwarder):
    """A Forwarder whose requests carry llama-server's `lora` list instead of a model name."""

    def __init__(self, url: str, adapters: Sequence[str], cache_prompt: bool = False, **kw: Any):
        super().__init__(url, **kw)
        self.cache_prompt = cache_prompt  # only with llama-server --cache-ram 0 (module docstring)
        self.root = self.url.removesuffix("/v1")
        self.adapters = list(adapters)  # the library's task adapters and the mixed one
        self.ids: dict[str, int] | None = None
        self.echoes = False  # llama-server refuses echo (lm-evaluation-harness issue 4158)
        self._lock = asyncio.Lock()

    def model_for(self, route: Route) -> str:
        return route.adapter  # BASE: every scale 0

    async def lora_ids(self) -> dict[str, int]:
        """{adapter name: llama-server id}, from GET /lora-adapters (once)."""
        import httpx

        async with self._lock:
            if self.ids is not None:
                return self.ids
            try:
                r = await self.client.get(f"{self.root}/lora-adapters")
                listing = r.json()
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                raise ChainloraError(f"llama-server at {self.root}: cannot list its adapters ({e.__class__.__name__})")
            if r.status_code != 200 or not isinstance(listing, list):
                raise ChainloraError(f"llama-server at {self.root}: GET /lora-adapters answered {r.status_code}")
            ids = {PurePath(str(e.get("path", ""))).stem: int(e["id"]) for e in listing
                   if isinstance(e, dict) and isinstance(e.get("id"), int)}
            missing = [a for a in self.adapters if a not in ids]
            if missing:
                raise ChainloraError(f"llama-server at {self.root} has no adapter {missing[0]!r} loaded: start it "
                                     "with llama-server.sh from `chainlora export --format gguf`")
            self.ids = ids
            return ids

    async def with_lora(self, body: dict) -> dict:
        """The completion body with every loaded adapter's scale explicit."""
        ids = await self.lora_ids()
        chosen = body["model"]
        if chosen != BASE and chosen not in ids:
            raise ChainloraError(f"llama-server has no adapter {chosen!r}")
        return {**body, "model": "base" if chosen == BASE else chosen, "cache_prompt": self.cache_prompt,
                "lora": [{"id": i, "scale": 1.0 if name == chosen else 0.0} for name, i in sorted(ids.items())]}

    async def complete(self, body: dict) -> tuple[int, dict]:
        try:
            body = await self.with_lora(body)
        except ChainloraError as e:
            return 502, backend_error(str(e))
        return await super().complete(body)

    async def stream(self, body: dict, kind: str, model: str, route_field: dict | None) -> AsyncIterator[str]:
        try:
            body = await self.with_lora(body)
        except ChainloraError as e:
            yield responses.sse(backend_error(str(e)))
            yield responses.DONE
            return
        async for event in super().stream(body, kind, model, route_field):
            yield event
