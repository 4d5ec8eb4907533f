"""The chain-vs-mixed budget sweep's results as tables and a plot (bench/chain_vs_mixed.py writes
them; `chainlora report LIB --sweep DIR` shows them beside the library's own evaluation).

A sweep directory holds results.jsonl: one row per (budget, seed, branch mode) library, each with
per-task answer perplexity of the task's own adapter (oracle routing), the mixed adapter, the
routed chain (and Arrow for the from-scratch library) and per-task exact match. Systems compared:

    mixed           one LoRA on all tasks from zero for the whole budget (the `none` library's)
    chain none      the paper's from-scratch task adapters, routed
    mixed (trunk)   the mixed adapter that continues the shared trunk (the `warm` library's)
    chain warm      task adapters that continue the trunk's LoRA, routed
    chain residual  the trunk merged into W, a fresh LoRA per task on the residual, routed
    arrow           PEFT's Arrow router over the from-scratch task adapters

Each chain is counted against the mixed adapter of the same compute: `chain none` and `arrow`
against `mixed`, `chain warm` / `residual` against `mixed (trunk)`.
"""

from __future__ import annotations

import io
import math
import statistics
from pathlib import Path

from chainlora.data.records import jsonl_rows
from chainlora.errors import ChainloraError

MODES = ("none", "warm", "residual")
SYSTEMS = ("mixed", "chain none", "mixed (trunk)", "chain warm", "chain residual", "arrow")
Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows), as chainlora.eval.report draws them


def load(directory: str | Path) -> list[dict]:
    """The rows of DIR/results.jsonl (DIR may also name the file); a bad line is one clear error."""
    path = Path(directory)
    path = path / "results.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise ChainloraError(f"{path}: no sweep results (run bench/chain_vs_mixed.py)")
    rows = []
    for where, row in jsonl_rows(path):  # a malformed line is named by file and line
        if not isinstance(row, dict) or not {"budget", "seed", "mode", "perplexity", "exact_match"} <= set(row) \
                or row["mode"] not in MODES:
            raise ChainloraError(f"{where}: not a chain_vs_mixed result row")
        rows.append(row)
    return rows


def geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def systems_of(row: dict) -> dict[str, tuple[dict, dict]]:
    """system name -> ({task: perplexity}, {task: exact match}) from one library's row."""
    ppl, em, mode = row["perplexity"], row["exact_match"], row["mode"]
    pick = lambda d, k: {t: v.get(k, float("nan")) for t, v in d.items()}  # noqa: E731
    out = {f"chain {mode}": (pick(ppl, "chain"), pick(em, "chain"))}
    if mode == "none":
        out["mixed"] = (pick(ppl, "mixed"), pick(em, "mixed"))
        if all("arrow" in v for v in ppl.values()):
            out["arrow"] = (pick(ppl, "arrow"), pick(em, "arrow"))
    if mode == "warm":
        out["mixed (trunk)"] = (pick(ppl, "mixed"), pick(em, "mixed"))
    return out


def _reference(rows: list[dict], row: dict, system: str) -> dict | None:
    """{task: perplexity} of the mixed adapter with the same compute as `system` in `row`'s run."""
    if not (system.startswith("chain") or system == "arrow"):
        return None
    want = "none" if system in ("chain none", "arrow") else "warm"
    ref = next((r for r in rows if (r["budget"], r["seed"], r["mode"]) == (row["budget"], row["seed"], want)), None)
    return ref and {t: v["mixed"] for t, v in ref["perplexity"].items()}


def summary(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    """(budget, system) -> one entry per seed: geomean perplexity, mean exact match, tasks won."""
    by: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        for name, (ppl, em) in systems_of(row).items():
            ref = _reference(rows, row, name)
            by.setdefault((row["budget"], name), []).append({
                "geomean": geomean(ppl.values()), "em": statistics.mean(em.values()),
                "wins": sum(ppl[t] < ref[t] for t in ppl if t in ref) if ref else None, "n": len(ppl)})
    return by


def fmt(vals: list[float], spec: str) -> str:
    """Mean ± standard deviation over seeds (the mean alone for one seed)."""
    if not vals:
        return "—"
    m = statistics.mean(vals)
    return f"{m:{spec}}" + (f" ± {statistics.stdev(vals):{spec}}" if len(vals) > 1 else "")


def _seeds(by: dict, budget: int) -> str:
    n = max((len(v) for (b, _), v in by.items() if b == budget), default=0)
    return f"{budget} ({n} seed{'s' if n != 1 else ''})"


def tables(rows: list[dict]) -> list[Table]:
    """Perplexity (with tasks won), exact match, oracle routing, and per task at the largest budget."""
    by = summary(rows)
    budgets = sorted({b for b, _ in by})
    header = ["budget (steps)", *SYSTEMS]
    ppl_rows, em_rows = [], []
    for b in budgets:
        cells = []
        for s in SYSTEMS:
            runs = by.get((b, s), [])
            wins = [r["wins"] for r in runs if r["wins"] is not None]
            cells.append(fmt([r["geomean"] for r in runs], ".2f") + (f" [{fmt(wins, '.1f')} of {runs[0]['n']}]" if wins else ""))
        ppl_rows.append([_seeds(by, b), *cells])
        em_rows.append([_seeds(by, b), *[fmt([r["em"] for r in by.get((b, s), [])], ".3f") for s in SYSTEMS]])
    out: list[Table] = [
        ("Budget sweep — geometric mean answer perplexity over the tasks (lower is better), mean ± std over seeds; "
         "[tasks where the system beats the mixed adapter of the same compute]", header, ppl_rows),
        ("Budget sweep — mean exact match of greedy answers (higher is better)", header, em_rows),
        oracle(rows, budgets), paired(rows, budgets)]
    last = [r for r in rows if r["budget"] == budgets[-1]] if budgets else []
    if last:
        cell: dict[tuple[str, str], list[float]] = {}
        for row in last:
            for name, (ppl, _) in systems_of(row).items():
                for t, v in ppl.items():
                    cell.setdefault((t, name), []).append(v)
        tasks = list(last[0]["perplexity"])
        out.append((f"Budget sweep — answer perplexity per task at budget {budgets[-1]} (mean ± std over seeds)",
                    ["task", *SYSTEMS], [[t, *[fmt(cell.get((t, s), []), ".2f") for s in SYSTEMS]] for t in tasks]))
    return out


def oracle(rows: list[dict], budgets: list[int]) -> Table:
    """The task adapters with oracle routing (every record on its own task's adapter): what
    specialisation buys with routing taken out, against the mixed adapter of the same compute."""
    body = []
    for b in budgets:
        cells = []
        for mode in MODES:
            runs = [r for r in rows if r["budget"] == b and r["mode"] == mode]
            refs = [_reference(rows, r, f"chain {mode}") for r in runs]
            wins = [sum(v["own"] < ref[t] for t, v in r["perplexity"].items() if t in ref)
                    for r, ref in zip(runs, refs) if ref]
            cells.append(fmt([geomean(v["own"] for v in r["perplexity"].values()) for r in runs], ".2f")
                         + (f" [{fmt(wins, '.1f')}]" if wins else ""))
        body.append([str(b), *cells])
    return ("Budget sweep — oracle routing (each record on its own task's adapter): geometric mean perplexity "
            "[tasks where it beats the mixed adapter of the same compute]",
            ["budget (steps)", "own none", "own warm", "own residual"], body)


def paired(rows: list[dict], budgets: list[int]) -> Table:
    """Each chain against the mixed adapter of the same compute, record-free but paired: the mean
    over (seed, task) of log(chain / mixed) perplexity, as a percentage, ± one standard error. A
    gap within two standard errors of 0 is not a result."""
    systems = [s for s in SYSTEMS if s.startswith("chain") or s == "arrow"]
    body = []
    for b in budgets:
        cells = []
        for name in systems:
            logs = []
            for row in (r for r in rows if r["budget"] == b):
                ref = _reference(rows, row, name)
                ppl = systems_of(row).get(name, ({}, {}))[0]
                logs += [math.log(v / ref[t]) for t, v in ppl.items() if ref and t in ref]
            if len(logs) < 2:
                cells.append("—")
                continue
            m, se = statistics.mean(logs), statistics.stdev(logs) / len(logs) ** 0.5
            cells.append(f"{math.expm1(m):+.1%} ± {se:.1%} (n={len(logs)})")
        body.append([str(b), *cells])
    return ("Budget sweep — perplexity of each chain relative to the mixed adapter of the same compute, paired "
            "by seed and task: exp(mean log ratio) − 1 ± one standard error (negative: the chain is better)",
            ["budget (steps)", *systems], body)


def routing_note(rows: list[dict]) -> str:
    """Which selector routed the chain, its top-1, and how many records reached their own adapter."""
    routed = [r for r in rows if "selector" in r]
    if not routed:
        return "The chain is routed by the `score` selector (rows recorded before the sweep routed by the default)."
    right = [statistics.mean(v["routed_right"] for v in r["perplexity"].values()) for r in routed]
    return (f"The chain is routed by the library's default selector ({', '.join(sorted({r['selector'] for r in routed}))}, "
            f"its calibrated threshold and out-of-library detector): top-1 {fmt([r['top1'] for r in routed], '.3f')}; "
            f"records answered by their own task's adapter {fmt(right, '.3f')} (the rest by the mixed adapter or a "
            "wrong one).")


def markdown(tabs: list[Table]) -> str:
    """The tables as GitHub Markdown (bench/RESULTS.md)."""
    lines: list[str] = []
    for title, header, body in tabs:
        lines += [f"{title}:", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body] + [""]
    return "\n".join(lines)


def plot(rows: list[dict]) -> bytes:
    """Geometric-mean perplexity and exact match against budget (log scale), one line a system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = summary(rows)
    budgets = sorted({b for b, _ in by})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for s in SYSTEMS:
        xs = [b for b in budgets if by.get((b, s))]
        if xs:
            ax1.plot(xs, [statistics.mean(r["geomean"] for r in by[(b, s)]) for b in xs], marker="o", label=s)
            ax2.plot(xs, [statistics.mean(r["em"] for r in by[(b, s)]) for b in xs], marker="o", label=s)
    for ax, title in ((ax1, "answer perplexity (geomean, lower is better)"), (ax2, "exact match (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("optimizer steps of the whole system")
        ax.set_title(title, fontsize=10)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def section(directory: str | Path) -> tuple[list[Table], bytes, str]:
    """(tables, plot PNG, routing note) of one sweep directory, for `chainlora report --sweep`."""
    rows = load(directory)
    if not rows:
        raise ChainloraError(f"{directory}: the sweep has no finished runs yet")
    return tables(rows), plot(rows), routing_note(rows)
