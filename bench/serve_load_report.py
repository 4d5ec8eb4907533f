"""Tables and plot of bench/serve_load.py's rows (the latest session that ran each system)."""

from __future__ import annotations

import json
from pathlib import Path

ORDER = ("pool", "peft", "llamacpp-f32", "llamacpp-q8", "llama-server-f32", "llamacpp-f32-nocache")


def latest(path: Path) -> list[dict]:
    """Each (system, traffic)'s rows from the last session that ran it."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    last: dict[tuple, str] = {}
    for r in rows:
        key = (r["system"], r["traffic"])
        last[key] = max(last.get(key, ""), r["session"])
    return [r for r in rows if r["session"] == last[(r["system"], r["traffic"])]]


def sustainable(rows: list[dict], goal_s: float) -> float:
    """The highest offered rate whose p99 TTFT is within goal_s, with every request of the
    window answered or still running and none failed (0: not even the lowest rate)."""
    ok = [r["rate"] for r in rows if r["errors"] == 0 and (r["ttft_s"]["p99"] or 1e9) <= goal_s]
    best = 0.0
    for r in sorted(rows, key=lambda r: r["rate"]):  # the first rate that fails ends the run of good ones
        if r["rate"] not in ok:
            break
        best = r["rate"]
    return best


def table(rows: list[dict]) -> str:
    head = ("| system | traffic | rate req/s | done/s | out tok/s | TTFT p50 / p90 / p99 s | ITL p50 / p99 ms "
            "| E2E p50 / p99 s | done / cut / err |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(rows, key=lambda r: (ORDER.index(r["system"]), r["traffic"], r["rate"])):
        t, i, e = r["ttft_s"], r["itl_s"], r["e2e_s"]
        ms = [f"{x * 1000:.0f}" if x is not None else "-" for x in (i["p50"], i["p99"])]
        lines.append(f"| {r['system']} | {r['traffic']} | {r['rate']:g} | {r['completed_per_s']:.2f} | "
                     f"{r['output_tokens_per_s']:.1f} | {t['p50']} / {t['p90']} / {t['p99']} | {ms[0]} / {ms[1]} | "
                     f"{e['p50']} / {e['p99']} | {r['completed']} / {r['cut']} / {r['errors']} |")
    return "\n".join(lines)


def summary(rows: list[dict], goal_s: float) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["system"], r["traffic"]), []).append(r)
    lines = [f"| system | traffic | sustainable rate (p99 TTFT <= {goal_s:g} s) | peak out tok/s |", "|---|---|---|---|"]
    for key in sorted(by, key=lambda k: (ORDER.index(k[0]), k[1])):
        peak = max(r["output_tokens_per_s"] for r in by[key])
        lines.append(f"| {key[0]} | {key[1]} | {sustainable(by[key], goal_s):g} | {peak:.1f} |")
    pool_chain, pool_pinned = by.get(("pool", "chain"), []), by.get(("pool", "pinned"), [])
    pinned = {r["rate"]: r["output_tokens_per_s"] for r in pool_pinned}
    ratios = [f"{r['rate']:g}: {r['output_tokens_per_s'] / pinned[r['rate']]:.3f}" for r in sorted(
        pool_chain, key=lambda r: r["rate"]) if pinned.get(r["rate"])]
    if ratios:
        lines.append(f"\npool, ten adapters (chain) / one adapter (pinned), output tokens/s by rate: {', '.join(ratios)}")
    llama = by.get(("llamacpp-f32", "chain"), [])
    if pool_chain and llama:
        a, b = sustainable(pool_chain, goal_s), sustainable(llama, goal_s)
        lines.append(f"sustainable rate on chain traffic, pool / llama-server F32 (behind chainlora): {a:g} / {b:g}"
                     + (f" = {a / b:.2f}x" if b else " (llama-server sustains none of the rates)"))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, goal_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    by = {}
    for r in rows:
        by.setdefault((r["system"], r["traffic"]), []).append(r)
    colours = dict(zip(ORDER, ("tab:blue", "tab:green", "tab:red", "tab:orange", "tab:purple", "tab:brown")))
    for (name, traffic), rs in sorted(by.items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][1])):
        rs = sorted(rs, key=lambda r: r["rate"])
        kw = {"color": colours[name], "marker": "o" if traffic == "chain" else "s",
              "linestyle": "-" if traffic == "chain" else "--", "label": f"{name} ({traffic})"}
        ax1.plot([r["rate"] for r in rs], [r["ttft_s"]["p99"] for r in rs], **kw)
        ax2.plot([r["rate"] for r in rs], [r["output_tokens_per_s"] for r in rs], **kw)
    ax1.axhline(goal_s, color="grey", lw=0.8)
    ax1.set(xlabel="offered rate (requests/s, Poisson)", ylabel="p99 time to first token (s)", yscale="log",
            title="TTFT p99 (grey: the 2 s goal); solid: chain, dashed: pinned")
    ax2.set(xlabel="offered rate (requests/s, Poisson)", ylabel="output tokens/s (completed requests)",
            title="throughput")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(path: Path, plot_path: Path, goal_s: float) -> str:
    rows = latest(path)
    if not rows:
        return f"no rows in {path}"
    plot(rows, plot_path, goal_s)
    return summary(rows, goal_s) + "\n\n" + table(rows) + f"\n\nplot: {plot_path}"
