"""Evaluation of a library. So far: task-selection accuracy (Qiu et al. Table II).

Top-k accuracy counts an instruction as correct when its true task is among the selector's k
best; accuracy on held-out instruction templates (wording the router never saw in training)
is reported separately when records carry a `template` the training split did not use.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

from chainlora.data import Record


@dataclass
class SelectionScore:
    selector: str
    n: int
    top1: float
    top3: float
    heldout_n: int
    heldout_top1: float
    ms_per_instruction: float

    def to_dict(self) -> dict:
        return asdict(self)


def selection_accuracy(chain, records: Sequence[Record], selector: str,
                       heldout_templates: dict[str, set] | None = None) -> SelectionScore:
    """Route every record's instruction with `selector`; compare with its task."""
    t0 = time.perf_counter()
    routes = chain.route([r.text for r in records], top_k=3, selector=selector)
    ms = 1000 * (time.perf_counter() - t0) / max(len(records), 1)
    hits1 = [bool(rt.top_k) and rt.top_k[0][0] == r.task and not rt.fallback for r, rt in zip(records, routes)]
    hits3 = [any(t == r.task for t, _ in rt.top_k[:3]) for r, rt in zip(records, routes)]
    held = [i for i, r in enumerate(records)
            if heldout_templates and r.meta.get("template") in heldout_templates.get(r.task, ())]
    return SelectionScore(
        selector=selector, n=len(records), top1=sum(hits1) / len(records), top3=sum(hits3) / len(records),
        heldout_n=len(held), heldout_top1=(sum(hits1[i] for i in held) / len(held)) if held else float("nan"),
        ms_per_instruction=ms,
    )
