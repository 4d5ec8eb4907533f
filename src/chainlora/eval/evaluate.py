"""Evaluation of a library — Qiu et al.'s tables as numbers (`chainlora eval`).

Table I, perplexity per task of the base model, the task's own adapter M_t, the mixed adapter
and the chain (each record answered by the adapter its selector picks). Perplexity is over
response tokens only (chainlora.inference.scoring): PPL = exp(Σ NLL / N) over all answer
tokens of a task's records; the paper's 2^(Σ -log2 p / N) is the same number.
Table II, task selection: top-1 / top-3 accuracy, per-task precision and recall, the confusion
matrix, and accuracy on held-out instruction templates (wording the selector never saw).
Table III, the selectors side by side with their latency. Task metrics for short answers:
exact match, token F1 and chrF (sacrebleu) per task for base / mixed / chain, greedy answers.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

from chainlora.data.records import Record
from chainlora.errors import ChainloraError
from chainlora.inference.scoring import perplexity, pooled, record_nll  # Table I's measurement

NONE = "(none)"  # the selector named no task


def normalize(text: str) -> str:
    """Case, surrounding quotes / punctuation and inner whitespace do not count in a match."""
    return re.sub(r"\s+", " ", text.strip().strip("\"'`.!?;:").strip()).casefold()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over normalized whitespace tokens."""
    from collections import Counter

    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu, character 6-grams, beta 2), 0-100."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(predictions), [list(references)]).score)


# --------------------------------------------------------------------------- Table II / III


def selection(engine, records: Sequence[Record], selector: str, heldout: dict[str, set] | None = None) -> dict:
    """Route every record with `selector`; accuracy, precision / recall, confusion, latency."""
    from chainlora.inference.accuracy import route_labelled

    tasks = engine.tasks
    measured = route_labelled(engine, records, selector, heldout)
    routes, hit1, hit3, held, ms = (measured.routes, measured.hit1, measured.hit3, measured.held,
                                    measured.ms_per_instruction)
    picked = [rt.top_k[0][0] if rt.top_k and rt.task is not None else NONE for rt in routes]
    confusion = {t: {u: 0 for u in tasks + [NONE]} for t in tasks}
    for r, p in zip(records, picked):
        row = confusion.setdefault(r.task, {u: 0 for u in tasks + [NONE]})
        row[p] = row.get(p, 0) + 1
    per_task = {}
    for t in tasks:
        tp = confusion[t][t]
        predicted = sum(confusion[u][t] for u in tasks)
        actual = sum(confusion[t].values())
        per_task[t] = {"precision": tp / predicted if predicted else float("nan"),
                       "recall": tp / actual if actual else float("nan"), "n": actual}
    kept = [h for h, rt in zip(hit1, routes) if not rt.fallback]
    return {"selector": selector, "n": len(records), "top1": _mean(hit1), "top3": _mean(hit3),
            "heldout_n": len(held), "heldout_top1": _mean([hit1[i] for i in held]),
            "ms_per_instruction": ms, "fallback_rate": 1 - len(kept) / len(records) if records else float("nan"),
            "accepted_top1": _mean(kept), **selector_cost(engine.lib, selector),
            "per_task": per_task, "confusion": confusion,
            "confidence": [round(rt.probability, 4) for rt in routes],
            "correct": hit1, "routes": routes}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def selectors_of(engine) -> list[str]:
    """The selectors this library can run (Table III)."""
    from chainlora.inference import selectors

    return selectors.available(engine.lib)


def selector_cost(lib, selector: str) -> dict:
    """Training seconds and size on disk of what `selector` runs (score and generate share the
    task-selection LoRA; the out-of-library detector is not counted)."""
    from chainlora.library import kinds

    entry = lib.manifest.get(kinds.SELECTORS[selector].entry) if selector in kinds.SELECTORS else None
    if not entry:
        return {"train_seconds": None, "disk_mb": None}
    size = sum(f.stat().st_size for f in lib.path(entry).rglob("*") if f.is_file())
    return {"train_seconds": entry.get("seconds"), "disk_mb": size / 2**20}


# --------------------------------------------------------------------------- Table I


def perplexity_table(engine, by_task: dict[str, list[Record]], routes: dict[str, list],
                     arrow: Any = None) -> list[dict]:
    """Per task: perplexity of base, own adapter, mixed, the chain (routed per record) and, given
    `arrow` (eval.arrow.Arrow), PEFT's Arrow router over the same task adapters."""
    from chainlora.inference.engine import BASE

    rows = []
    for task, records in by_task.items():
        row: dict[str, Any] = {"task": task, "n": len(records)}
        systems = {"base": BASE, "own": task} | ({"mixed": "mixed"} if engine.lib.mixed else {})
        scored: dict[str, list[tuple[float, int]]] = {}
        for name, adapter in systems.items():
            scored[adapter] = record_nll(engine, records, adapter)
            nll, row["tokens"] = pooled(scored[adapter])
            row[name] = perplexity(nll, row["tokens"])
        chosen = [rt.adapter for rt in routes[task]]
        for adapter in sorted(set(chosen) - set(scored)):  # routed elsewhere: score just those
            idx = [i for i, a in enumerate(chosen) if a == adapter]
            part = record_nll(engine, [records[i] for i in idx], adapter)
            scored[adapter] = [(0.0, 0)] * len(records)
            for i, v in zip(idx, part):
                scored[adapter][i] = v
        per = [scored[a][i] for i, a in enumerate(chosen)]  # each record under its chosen adapter
        row["chain"] = perplexity(*pooled(per))
        if arrow is not None:
            row["arrow"] = perplexity(*pooled(record_nll(engine, records, "arrow", model=arrow.model)))
        # the selector named the task (a gated task is answered by the mixed adapter: still right)
        row["routed_right"] = _mean([rt.task == task and not rt.fallback for rt in routes[task]])
        rows.append(row)
    return rows


def examples_per_step(lib) -> int:
    """Examples one optimizer step saw in this library's training: batch x accumulation."""
    t = (lib.manifest.get("training") or {}).get("training") or {}
    return (t.get("batch_size") or 0) * (t.get("gradient_accumulation_steps") or 1)


def compute_of(lib) -> dict:
    """What each system cost to train, from the manifest: optimizer steps, examples (steps x
    batch x accumulation) and the non-padding tokens the Trainer counted. A shared trunk counts
    once for the chain (trunk + every branch) and once for the mixed adapter that continues it."""
    per_step = examples_per_step(lib)
    trunk = lib.trunk or {}

    def cost(entries: list[dict]) -> dict:
        steps = sum(e.get("steps", 0) for e in entries)
        return {"steps": steps, "examples": steps * per_step, "tokens": sum(e.get("tokens", 0) for e in entries),
                "trunk_steps": trunk.get("steps", 0)}

    out = {"chain": cost(([trunk] if trunk else []) + lib.tasks)}
    if lib.mixed:
        out["mixed"] = cost(([trunk] if trunk and lib.mixed.get("branch") else []) + [lib.mixed])
    return out


def mean_row(rows: list[dict]) -> dict:
    """The paper's mean row: the arithmetic mean of per-task perplexities."""
    keys = [k for k in ("base", "own", "mixed", "chain", "arrow") if all(k in r for r in rows)]
    return {"task": "mean", **{k: _mean([r[k] for r in rows]) for k in keys}}


# --------------------------------------------------------------------------- task metrics


def system_answers(engine, records: Sequence[Record], systems: Sequence[str], max_new_tokens: int,
                   batch_size: int = 32) -> dict[str, list]:
    """Greedy Answers of each system — "chain" (routed), "base", "mixed" or a task (pinned) —
    for the same records (the judge and the human sheets compare these); a "mixed" without a
    mixed adapter in the library is left out."""
    from chainlora.inference.engine import BASE

    out = {}
    texts = [r.text for r in records]
    for system in systems:
        if system == "mixed" and not engine.lib.mixed:
            continue
        task = None if system == "chain" else BASE if system == "base" else system
        out[system] = [a for i in range(0, len(texts), batch_size)
                       for a in engine.generate(texts[i:i + batch_size], task=task, max_new_tokens=max_new_tokens)]
    return out


ANSWER_SYSTEMS = ("base", "mixed", "chain", "arrow")


def task_metrics(engine, by_task: dict[str, list[Record]], routes: dict[str, list],
                 max_new_tokens: int = 16, batch_size: int = 32, arrow: Any = None,
                 only: Sequence[str] = ANSWER_SYSTEMS) -> tuple[dict, dict]:
    """Greedy answers of base / mixed / chain (/ arrow), those of them in `only`; EM, token F1,
    chrF per task and system. Each system answers all records in full batches across tasks (the
    chain's batches mix adapters): a task's 16 records alone would leave half of every batch empty.
    Returns (metrics, answers) — answers[system][task] is the list of texts."""
    from chainlora.inference.engine import BASE

    systems = [s for s in ["base"] + (["mixed"] if engine.lib.mixed else []) + ["chain"] + (["arrow"] if arrow else [])
               if s in only]
    flat = [r for rs in by_task.values() for r in rs]
    flat_routes = [rt for t in by_task for rt in routes[t]]
    texts = [r.text for r in flat]
    answers: dict[str, dict] = {s: {} for s in systems}
    for system in systems:
        out: list[str] = []
        for i in range(0, len(flat), batch_size):
            part = texts[i:i + batch_size]
            if system == "arrow":
                out += arrow.generate(engine, part, max_new_tokens)
            elif system == "chain":
                out += [a.text for a in engine.generate(part, routes=flat_routes[i:i + batch_size],
                                                        max_new_tokens=max_new_tokens)]
            else:
                out += [a.text for a in engine.generate(part, task=BASE if system == "base" else "mixed",
                                                        max_new_tokens=max_new_tokens)]
        j = 0
        for task, records in by_task.items():
            answers[system][task], j = out[j:j + len(records)], j + len(records)
    metrics: dict[str, dict] = {}
    for task, records in by_task.items():
        refs = [r.output for r in records]
        metrics[task] = {system: {"exact_match": _mean([exact_match(p, r) for p, r in zip(got, refs)]),
                                  "token_f1": _mean([token_f1(p, r) for p, r in zip(got, refs)]),
                                  "chrf": chrf(got, refs)}
                         for system in systems for got in [answers[system][task]]}
    return metrics, answers


# --------------------------------------------------------------------------- the whole run


def by_task_of(engine, records: Sequence[Record], per_task: int | None = None) -> dict[str, list[Record]]:
    """Records grouped by the library's tasks (others dropped), at most `per_task` each."""
    groups: dict[str, list[Record]] = {t: [] for t in engine.tasks}
    for r in records:
        if r.task in groups and (per_task is None or len(groups[r.task]) < per_task):
            groups[r.task].append(r)
    return {t: g for t, g in groups.items() if g}


def evaluate(engine, records: Sequence[Record], *, heldout: dict[str, set] | None = None,
             per_task: int | None = None, max_new_tokens: int = 16, generate: bool = True,
             selectors: Sequence[str] | None = None, arrow: bool = True,
             answer_systems: Sequence[str] = ANSWER_SYSTEMS) -> dict:
    """Tables I-III and the task metrics for `records` (the whole evaluation, as JSON-able data).
    arrow: also evaluate PEFT's Arrow router over the task adapters (skipped, with the reason in
    result["arrow"], where the adapters do not allow it). answer_systems: which systems answer
    every record for the task metrics (all by default)."""
    from chainlora.console import bar
    from chainlora.eval import arrow as arrow_

    by_task = by_task_of(engine, records, per_task)
    if not by_task:
        raise ChainloraError(f"no records of this library's tasks ({', '.join(engine.tasks)}) in the data")
    flat = [r for rs in by_task.values() for r in rs]
    steps = bar(total=3 + bool(generate), desc="evaluate", unit="part")
    sel = {}
    for s in selectors if selectors is not None else selectors_of(engine):
        steps.set_postfix_str(f"selector {s}")
        sel[s] = selection(engine, flat, s, heldout)
    steps.update()
    if engine.selector in sel:  # the library's own selector decides the chain's routes
        routes_flat = sel[engine.selector]["routes"]
    elif sel:  # the chosen selector is not in this library (e.g. score without a router)
        routes_flat = next(iter(sel.values()))["routes"]
    elif len(engine.tasks) == 1:
        routes_flat = engine.routes_for([r.text for r in flat], None)
    else:  # no selector at all: the "chain" is each task's own adapter (said in the result)
        routes_flat = engine.routes_for([r.text for r in flat], [r.task for r in flat])
    routes, i = {}, 0
    for task, rs in by_task.items():
        routes[task], i = routes_flat[i:i + len(rs)], i + len(rs)
    peer, arrow_info = None, {"skipped": "not asked for (--no-arrow)"}
    if arrow:
        reason = arrow_.unavailable(engine.lib)
        if reason:
            arrow_info = {"skipped": reason}
        else:
            steps.set_postfix_str("loading Arrow")
            peer = arrow_.load(engine)
            arrow_info = peer.info()
    steps.set_postfix_str("perplexity")
    rows = perplexity_table(engine, by_task, routes, peer)
    steps.update()
    chosen_by = routes_flat[0].selector if routes_flat else engine.selector
    result: dict[str, Any] = {"n": len(flat), "tasks": list(by_task), "selector": chosen_by,
                              "threshold": engine.threshold, "perplexity": rows, "perplexity_mean": mean_row(rows),
                              "chain_beats_mixed": sum(r["chain"] < r["mixed"] for r in rows if "mixed" in r),
                              "arrow": arrow_info, "gated": sorted(engine.gated),
                              "compute": compute_of(engine.lib),
                              "selection": {k: {kk: vv for kk, vv in v.items() if kk != "routes"}
                                            for k, v in sel.items()}}
    steps.update()
    if generate:
        steps.set_postfix_str("answers")
        metrics, answers = task_metrics(engine, by_task, routes, max_new_tokens, arrow=peer,
                                        only=answer_systems)
        result["metrics"], result["answers"] = metrics, answers
        result["routes"] = {t: [rt.adapter for rt in rs] for t, rs in routes.items()}
        result["references"] = {t: [{"instruction": r.text, "output": r.output} for r in rs]
                                for t, rs in by_task.items()}
        steps.update()
    steps.close()
    if peer is not None:
        result["chain_beats_arrow"] = sum(r["chain"] < r["arrow"] for r in rows)
    return result


# --------------------------------------------------------------------------- data and results


def load_eval_data(source: str) -> tuple[list[Record], dict[str, set] | None, str]:
    """Records to evaluate on, held-out templates (known for the bundled data), a result name."""
    from pathlib import Path

    from chainlora.data.records import heldout_templates, load_demo, read_records

    if source == "demo":
        demo = load_demo()
        return [r for d in demo.values() for r in d.test], heldout_templates(demo), "demo"
    return list(read_records(source)), None, Path(source).name.split(".")[0]


def json_safe(x: Any) -> Any:
    """JSON without NaN (browsers and strict parsers refuse it): NaN becomes null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def save_eval(root, name: str, result: dict, data: str):
    """LIB/eval/<name>.json, atomically; returns its path."""
    import datetime as dt
    from pathlib import Path

    from chainlora import atomic
    from chainlora.data.records import check_task_name

    check_task_name(name, "--name")
    out = {"data": data, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **result}
    return atomic.write_json(Path(root) / "eval" / f"{name}.json", json_safe(out))
