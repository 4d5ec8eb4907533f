"""How well a selector routes labelled instructions: the one measurement behind `chainlora
train`'s choice of default selector (chainlora.train.selection) and `chainlora eval`'s Tables
II-III (chainlora.eval.evaluate)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from chainlora.data.records import Record


@dataclass
class Routed:
    """Labelled records routed by one selector."""

    routes: list  # engine.Route per record
    hit1: list[bool]  # the selector's best task is the record's (no label found: a miss)
    hit3: list[bool]  # the record's task is among the top 3
    held: list[int]  # indices of records whose instruction template no selector trained on
    ms_per_instruction: float  # one batched pass, after an untimed warm-up

    @property
    def confidence(self) -> list[float]:
        return [rt.probability for rt in self.routes]


def route_labelled(engine: Any, records: Sequence[Record], selector: str,
                   heldout: dict[str, set] | None = None) -> Routed:
    """Route every record with `selector` in one timed pass (the first record routed once before,
    untimed: first-use loading and warm-up)."""
    texts = [r.text for r in records]
    engine.route(texts[:1], top_k=3, selector=selector)
    t0 = time.perf_counter()
    routes = engine.route(texts, top_k=3, selector=selector)
    ms = 1000 * (time.perf_counter() - t0) / max(len(records), 1)
    hit1 = [rt.task is not None and rt.task == r.task for rt, r in zip(routes, records)]
    hit3 = [any(t == r.task for t, _ in rt.top_k[:3]) for rt, r in zip(routes, records)]
    held = [i for i, r in enumerate(records) if heldout and r.meta.get("template") in heldout.get(r.task, ())]
    return Routed(routes, hit1, hit3, held, ms)
