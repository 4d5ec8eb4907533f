"""The per-task gate (`chain.gate`), at the end of `chainlora train`: serve a task with the mixed
adapter where its own adapter does not beat it.

Why: at small budgets a task adapter (a few branch steps, or a from-scratch LoRA) can lose to the
mixed adapter on its own task (bench/RESULTS.md: over three seeds the branches win on about half
the tasks). Which tasks lose differs from seed to seed, so no fixed rule picks them; a measurement
on records no adapter trained on can. `chain.gate_per_task` training records a task are held out
of every adapter and selector (chainlora.train.plan.gate_records); each task's own adapter and the
mixed adapter score their answers there (answer perplexity, chainlora.inference.scoring), and a
task whose adapter is not strictly better is marked `serve: mixed`. The engine then answers
requests routed to that task with the mixed adapter (Route.reason "gated"); a request that names
the task's adapter still gets it.

Recorded in the manifest's `gate`, with a fingerprint of its own: kept while the task adapters,
the mixed adapter and the held-out records are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from chainlora.data.records import Record
from chainlora.train.config import Config


def fingerprint(records: dict[str, list[Record]], adapter_prints: dict[str, str], system_prompt: str | None) -> str:
    """What decides the gate: the adapters compared (by their fingerprints), the held-out records,
    the system prompt they are scored under."""
    rows = {t: [[r.text, r.output] for r in rs] for t, rs in records.items()}
    blob = json.dumps([rows, adapter_prints, system_prompt], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def decide(own: float, mixed: float) -> str:
    """Which adapter serves the task: its own only where it is strictly better (ties: mixed, the
    adapter that also serves every other fallback)."""
    return "task" if own < mixed else "mixed"


def measure(root: Path, manifest: dict, base: Any, cfg: Config, records: dict[str, list[Record]],
            fp: str) -> dict | None:
    """Main process, after every adapter is trained into `root`: the `gate` block (None when the
    gate is off, the library has no mixed adapter, or no task has held-out records). Leaves
    `base` as it found it."""
    from chainlora.inference.engine import Engine
    from chainlora.inference.scoring import perplexity, pooled, record_nll
    from chainlora.library.store import Library

    lib = Library(root, manifest)
    tasks = [t for t in lib.task_names if records.get(t)]
    if not cfg.chain.gate or not lib.mixed or not tasks:
        return None
    engine = Engine(lib, base, threshold=0.0, novelty=False)
    try:
        per_task = {}
        for t in tasks:
            own = perplexity(*pooled(record_nll(engine, records[t], t)))
            mixed = perplexity(*pooled(record_nll(engine, records[t], "mixed")))
            per_task[t] = {"n": len(records[t]), "own": round(own, 4), "mixed": round(mixed, 4),
                           "serve": decide(own, mixed)}
    finally:
        engine.close()
    return {"fingerprint": fp, "per_task": cfg.chain.gate_per_task, "tasks": per_task,
            "gated": [t for t, v in per_task.items() if v["serve"] == "mixed"]}


def summary(gate: dict | None) -> str | None:
    """One line for the end of `chainlora train`."""
    if not gate:
        return None
    gated = gate["gated"]
    n = len(gate["tasks"])
    if not gated:
        return f"gate: every task's own adapter beats the mixed adapter on its held-out records ({n} tasks)"
    return (f"gate: {len(gated)} of {n} tasks answered by the mixed adapter (it beat their own on "
            f"held-out records): {', '.join(gated)}")
