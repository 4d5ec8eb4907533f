"""The evaluation's tables for the terminal (rich), from `evaluate.evaluate`'s result."""

from __future__ import annotations

import math

from rich.table import Table


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def perplexity(result: dict) -> Table:
    """Table I: perplexity per task, base / own adapter / mixed / chain / Arrow."""
    rows, mean = result["perplexity"], result["perplexity_mean"]
    cols = [c for c in ("base", "own", "mixed", "chain", "arrow") if c in mean]
    names = {"base": "base (zero-shot)", "own": "own adapter M_t", "mixed": "mixed", "chain": "chain (routed)",
             "arrow": "Arrow (PEFT)"}
    t = Table(title="Table I — answer perplexity per task (lower is better)")
    t.add_column("task")
    for c in cols:
        t.add_column(names[c], justify="right")
    t.add_column("routed right", justify="right")
    for r in rows:
        best = min(r[c] for c in cols)
        t.add_row(r["task"], *[f"[bold]{_f(r[c])}[/bold]" if r[c] == best else _f(r[c]) for c in cols],
                  _f(r["routed_right"], ".0%"))
    t.add_row("[bold]mean[/bold]", *[_f(mean[c]) for c in cols], "")
    if "mixed" in mean:
        t.caption = (f"chain < mixed on {result['chain_beats_mixed']} of {len(rows)} tasks" + arrow_caption(result)
                     + f"; chain routed by the {result['selector']} selector" + gate_caption(result)
                     + compute_caption(result))
    return t


def arrow_caption(result: dict) -> str:
    """", chain < Arrow on 7 of 10" — or why Arrow was not evaluated."""
    arrow = result.get("arrow") or {}
    if "chain_beats_arrow" in result:
        return (f", chain < Arrow on {result['chain_beats_arrow']} of {len(result['perplexity'])} "
                f"(Arrow top-{arrow.get('top_k')})")
    return f" (Arrow skipped: {arrow['skipped']})" if arrow.get("skipped") else ""


def gate_caption(result: dict) -> str:
    """"; the mixed adapter answers antonym, rhyme (chain.gate)" — or nothing."""
    gated = result.get("gated")
    return f"; the mixed adapter answers {', '.join(gated)} (chain.gate)" if gated else ""


def compute_caption(result: dict) -> str:
    """"; trained: chain 160 steps (trunk 80 + branches 80), 1,280 examples; mixed ..."."""
    parts = []
    for name, c in (result.get("compute") or {}).items():
        split = f" (trunk {c['trunk_steps']} + {c['steps'] - c['trunk_steps']})" if c.get("trunk_steps") else ""
        parts.append(f"{name} {c['steps']} steps{split}, {c['examples']:,} examples, {c['tokens']:,} tokens")
    return "\ntrained: " + "; ".join(parts) if parts else ""


SELECTION_HEADER = ["selector", "n", "top-1", "top-3", "top-1 held-out", "ms / instruction", "falls back",
                    "top-1 kept", "train s", "disk MB"]


def selection_rows(result: dict) -> list[list[str]]:
    """Tables II / III as text cells: accuracy, latency, the fallback the engine's threshold and
    out-of-library detector cause, training time and disk size; the library's default marked *."""
    rows = []
    for s in result["selection"].values():
        held = f"{_f(s['heldout_top1'], '.1%')} of {s['heldout_n']}" if s["heldout_n"] else "—"
        name = s["selector"] + (" *" if s["selector"] == result.get("selector") else "")
        rows.append([name, str(s["n"]), _f(s["top1"], ".1%"), _f(s["top3"], ".1%"), held,
                     _f(s["ms_per_instruction"], ".1f"), _f(s.get("fallback_rate"), ".1%"),
                     _f(s.get("accepted_top1"), ".1%"), _f(s.get("train_seconds"), ".0f"),
                     _f(s.get("disk_mb"), ".1f")])
    return rows


def selection(result: dict) -> Table:
    """Tables II and III: every selector's accuracy, latency, fallback and cost."""
    t = Table(title="Tables II/III — task selection (held-out templates: wording never seen in training; "
                    "* the default)")
    for c in SELECTION_HEADER:
        t.add_column(c, justify="left" if c == "selector" else "right")
    for row in selection_rows(result):
        t.add_row(*row)
    return t


def metrics(result: dict) -> Table:
    """Exact match / token F1 / chrF per task and system."""
    systems = list(next(iter(result["metrics"].values())))
    t = Table(title="task metrics of greedy answers: exact match / token F1 / chrF")
    t.add_column("task")
    for s in systems:
        t.add_column(s, justify="right")
    for task, by_system in result["metrics"].items():
        t.add_row(task, *[f"{_f(m['exact_match'], '.0%')} / {_f(m['token_f1'], '.2f')} / {_f(m['chrf'], '.1f')}"
                          for m in by_system.values()])
    return t


def exact_match_means(result: dict) -> dict[str, float]:
    """Mean over tasks of each system's exact match (greedy answers), best first."""
    by_task = result.get("metrics") or {}
    systems = list(next(iter(by_task.values()), {}))
    means = {s: sum(m[s]["exact_match"] for m in by_task.values()) / len(by_task) for s in systems}
    return dict(sorted(means.items(), key=lambda kv: -kv[1]))


def exact_match_line(result: dict) -> str:
    """"exact match, mean over N tasks: chain 0.412, mixed 0.388, base 0.050"."""
    means = exact_match_means(result)
    if not means:
        return ""
    n = len(result.get("metrics") or {})
    return f"exact match, mean over {n} tasks: " + ", ".join(f"{s} {v:.3f}" for s, v in means.items())


def paired(result: dict, a: str = "chain", b: str = "mixed") -> dict | None:
    """`a` against `b` in Table I, paired by task: the geometric-mean perplexity ratio, its
    standard error over tasks (log scale) and the number of tasks `a` wins. Why: one run of a
    few records a task swings by tens of percent per task; a count of wins alone hides that."""
    d = [math.log(r[a] / r[b]) for r in result.get("perplexity", []) if r.get(a) and r.get(b)]
    if len(d) < 2:
        return None
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return {"tasks": len(d), "wins": sum(x < 0 for x in d), "change": math.exp(mean) - 1, "se": se,
            "beyond_2se": abs(mean) > 2 * se}


def paired_line(result: dict, a: str = "chain", b: str = "mixed") -> str:
    """"chain vs mixed, paired over 10 tasks: -4.9% ± 3.3% perplexity (geometric mean ± 1 SE),
    ahead on 7; within two standard errors of no difference: no clear winner"."""
    p = paired(result, a, b)
    if p is None:
        return ""
    verdict = (f"beyond two standard errors: {a if p['change'] < 0 else b} is better" if p["beyond_2se"]
               else "within two standard errors of no difference: no clear winner")
    return (f"{a} vs {b}, paired over {p['tasks']} tasks: {p['change']:+.1%} ± {p['se']:.1%} answer perplexity "
            f"(geometric mean ± 1 SE), {a} ahead on {p['wins']}; {verdict}")
