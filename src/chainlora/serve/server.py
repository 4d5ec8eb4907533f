"""`Server`: what every route reads from `request.app.state.server`, built once and holding no
code of the routes. Its parts never call back into it: the preparer gets the engine and the
settings, the scheduler the engine and its sizes, the metrics the engine.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from chainlora.inference.engine import Engine
from chainlora.serve import catalog
from chainlora.serve.logprob_fields import Vocab
from chainlora.serve.metrics import Metrics
from chainlora.serve.prepare import Preparer
from chainlora.serve.scheduler import Scheduler
from chainlora.serve.settings import ServeSettings


class Server:
    """The chain, its settings, preparer, scheduler and metrics, and the forwarder (another
    server answers, see forward.py) where there is one.

    `Server(engine, settings)`, or `Server(engine, max_batch=4, ...)`: keywords replace fields
    of `settings` (serve/settings.py, where every default is)."""

    def __init__(self, engine: Engine, settings: ServeSettings | None = None, *, forwarder: Any = None,
                 **options: Any):
        self.engine, self.forwarder = engine, forwarder  # forward.Forwarder (or llamacpp's) or None
        self.settings = ServeSettings.of(settings, **options)
        s = self.settings
        self.preparer = Preparer(engine, s, forwarding=forwarder is not None)  # bodies -> Requests, own thread
        self.metrics = Metrics(engine)
        self.scheduler = Scheduler(engine, max_batch=s.max_batch, window_ms=s.window_ms, max_queue=s.max_queue,
                                   on_batch=self.metrics.batch, max_batch_tokens=s.max_batch_tokens,
                                   prefill_chunk=s.prefill_chunk)
        self.metrics.watch(self.scheduler.stats, self.preparer)  # cancels, timeouts, shed load: read when scraped
        self.created = int(time.time())
        self.vocab = Vocab(copy.deepcopy(engine.tok))  # token texts for logprobs, on the event loop's own copy

    @property
    def api_key(self) -> str | None:
        return self.settings.api_key

    def models(self) -> list[str]:
        """The model names a client may send (catalog.py), `chain` first."""
        return catalog.names(self.engine)

    def pin(self, model: str) -> str | None:
        """The adapter a `model` names (None: route), or 404."""
        return catalog.pin(self.engine, model)

    def close(self) -> None:
        """Stop the scheduler's worker and the preparer's thread (the app's shutdown)."""
        self.scheduler.close()
        self.preparer.close()
