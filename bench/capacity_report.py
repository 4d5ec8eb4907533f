"""bench/capacity.py's reading of its saved rows: the map (each routed system against the mixed
adapter, paired over seed x task), the "beyond two standard errors" line, every system's table,
where each adapter stopped, and the plot. Kept apart from the runner so a reader of the numbers
reads only this file."""

from __future__ import annotations

import math
from pathlib import Path

SYSTEMS = ("none", "warm", "residual", "mixed10", "mixed10a")  # warm, residual start from each other, else none
ONE = {"mixed10": "mixed10", "mixed10a": "mixed10 (alpha 2r)"}  # the one-adapter systems and their labels
LIB_SYSTEMS = ("mixed", "own", "chain")  # what each chain library reports (mixed r, oracle, routed)
BEST_ALPHA = "mixed10 (validation's alpha)"  # of mixed10 / mixed10a, the lower best validation loss
RESIDUAL, RESIDUAL_2R = "residual routed", "residual routed vs mixed 2r"  # a residual branch serves at rank 2r
# the map's rows: what a user deploys, each against the mixed adapter (and the plot's lines)
MAP_SYSTEMS = ("none routed", "warm routed", RESIDUAL, RESIDUAL_2R, "mixed10", "mixed10 (alpha 2r)", BEST_ALPHA)
PLOT_SYSTEMS = ("none routed", "warm routed", RESIDUAL, RESIDUAL_2R, BEST_ALPHA)  # the fair same-disk line


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def cells(rows: list[dict]) -> dict[tuple[int, int], dict[str, dict]]:
    """(rank, seed) -> system name -> {"ppl": {task: x}, "em": {task: x}}: the chain libraries'
    mixed / own / chain columns and mixed10, side by side."""
    out: dict[tuple[int, int], dict[str, dict]] = {}
    for r in rows:
        cell = out.setdefault((r["rank"], r["seed"]), {})
        if r["system"] in ONE:
            cell[ONE[r["system"]]] = {"ppl": {t: v[r["system"]] for t, v in r["perplexity"].items()},
                                      "em": {t: v[r["system"]] for t, v in r["exact_match"].items()},
                                      "loss": ((r.get("steps") or {}).get("finetune") or {}).get("loss")}
            continue
        names = {"chain": f"{r['system']} routed", "own": f"{r['system']} oracle"}
        if r["system"] == "none":
            names["mixed"] = "mixed r"
        elif r["system"] == "warm":
            names["mixed"] = "mixed r (trunk)"
        for key, name in names.items():
            cell[name] = {"ppl": {t: v[key] for t, v in r["perplexity"].items()},
                          "em": {t: v[key] for t, v in r["exact_match"].items()}}
    for cell in out.values():  # the same-disk adapter at the alpha its validation loss prefers
        a, b = cell.get(ONE["mixed10"]), cell.get(ONE["mixed10a"])
        if a and b and a["loss"] and b["loss"]:
            cell[BEST_ALPHA] = a if a["loss"] <= b["loss"] else b
    return out


def _beyond(logs: list[float]) -> str:
    """Mean of log(system / mixed r) over (seed, task) pairs as a percentage ± one standard error,
    in bold when beyond two standard errors of zero (bench/chain_vs_mixed.py's paired reading)."""
    m, se = _mean_se(logs)
    text = f"{100 * (math.exp(m) - 1):+.1f}% ± {100 * se:.1f}"
    return f"**{text}**" if abs(m) > 2 * se else text


def _pairs(by: dict, rank: int, name: str) -> list[tuple[dict, dict]]:
    """(system, baseline) cells for every seed where both ran. The baseline is the mixed adapter
    of the same rank; for RESIDUAL_2R it is the mixed adapter of rank 2r, the rank a residual
    branch is served at (the trunk's factors and its own, concatenated)."""
    system, base_rank = (RESIDUAL, 2 * rank) if name == RESIDUAL_2R else (name, rank)
    return [(by[(rank, s)][system], by[(base_rank, s)]["mixed r"])
            for (r, s) in sorted(by) if r == rank and system in by[(r, s)] and "mixed r" in by.get((base_rank, s), {})]


def paired_logs(by: dict, rank: int, name: str) -> list[float]:
    """log(system / mixed) for every (seed, task) where both ran: the paired reading's samples."""
    return [math.log(a["ppl"][t] / b["ppl"][t]) for a, b in _pairs(by, rank, name) for t in b["ppl"]]


def paired_em(by: dict, rank: int, name: str) -> list[float]:
    """Exact match minus the mixed adapter's, for every (seed, task) where both ran."""
    return [a["em"][t] - b["em"][t] for a, b in _pairs(by, rank, name) for t in b["em"]]


def _points(diffs: list[float]) -> str:
    """A paired exact-match difference in points ± one SE, bold beyond two standard errors."""
    m, se = _mean_se(diffs)
    text = f"{100 * m:+.1f} ± {100 * se:.1f}"
    return f"**{text}**" if abs(m) > 2 * se else text


def _seeds(by: dict, rank: int, name: str) -> int:
    return len(_pairs(by, rank, name))


def map_table(rows: list[dict], metric: str = "ppl") -> str:
    """The capacity map: each routed system against the same-rank mixed adapter, rank by rank —
    the paired change over (seed, task) ± 1 SE, bold beyond two standard errors, with its seeds:
    perplexity (%, `ppl`) or exact match (points, `em`)."""
    by = cells(rows)
    ranks = sorted({k[0] for k in by})
    values, text = (paired_logs, _beyond) if metric == "ppl" else (paired_em, _points)
    lines = ["| system | " + " | ".join(f"rank {r}" for r in ranks) + " |", "|---|" + "---:|" * len(ranks)]
    for name in MAP_SYSTEMS:
        row = [(text(v) + f" ({_seeds(by, r, name)}s)") if len(v := values(by, r, name)) > 1 else "—"
               for r in ranks]
        if any(cell != "—" for cell in row):  # a check not run (mixed10a) leaves no empty row
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def findings(rows: list[dict]) -> str:
    """Where a system is ahead of (or behind) the same-rank mixed adapter beyond two standard
    errors, in perplexity and in exact match, written out so the reading stays current as seeds land."""
    by = cells(rows)
    out = []
    for metric, values, better in (("answer perplexity", paired_logs, -1), ("exact match", paired_em, 1)):
        ahead, behind = [], []
        for rank in sorted({k[0] for k in by}):
            for name in MAP_SYSTEMS:
                v = values(by, rank, name)
                if len(v) < 2 or abs((m := _mean_se(v))[0]) <= 2 * m[1]:
                    continue
                change = (f"{100 * (math.exp(m[0]) - 1):+.1f}% ± {100 * m[1]:.1f}" if values is paired_logs
                          else f"{100 * m[0]:+.1f} points ± {100 * m[1]:.1f}")
                n = _seeds(by, rank, name)
                (ahead if m[0] * better > 0 else behind).append(
                    f"{name} at rank {rank} ({change}, {n} seed{'s' if n > 1 else ''})")
        out.append(f"{metric.capitalize()}, ahead of the same-rank mixed adapter: {'; '.join(ahead) or 'none'}; "
                   f"behind it: {'; '.join(behind) or 'none'}.")
    return "Beyond two standard errors (paired over seed x task). " + " ".join(out)


def table(rows: list[dict]) -> str:
    """Per rank: each system's geometric-mean perplexity and exact match (mean ± SE over seeds), its
    perplexity relative to the mixed adapter of rank r in the same seed (paired; negative = better)
    and the tasks it beats that mixed adapter on."""
    by = cells(rows)
    order = ["mixed r", "mixed r (trunk)", "mixed10", "mixed10 (alpha 2r)", BEST_ALPHA, "none oracle", "none routed",
             "warm oracle", "warm routed", "residual oracle", "residual routed"]
    lines = ["| rank | system | seeds | geomean PPL | vs mixed r (paired) | by seed x task ± 1 SE | tasks < mixed r "
             "| exact match |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for rank in sorted({k[0] for k in by}):
        seeds = sorted(s for (r, s) in by if r == rank)
        for name in order:
            have = [s for s in seeds if name in by[(rank, s)]]
            if not have:
                continue
            g = [_geomean(list(by[(rank, s)][name]["ppl"].values())) for s in have]
            em = [sum(by[(rank, s)][name]["em"].values()) / len(by[(rank, s)][name]["em"]) for s in have]
            paired = [s for s in have if "mixed r" in by[(rank, s)]]
            rel = [_geomean(list(by[(rank, s)][name]["ppl"].values())) /
                   _geomean(list(by[(rank, s)]["mixed r"]["ppl"].values())) - 1 for s in paired]
            wins = [sum(by[(rank, s)][name]["ppl"][t] < by[(rank, s)]["mixed r"]["ppl"][t]
                        for t in by[(rank, s)]["mixed r"]["ppl"]) for s in paired]
            gm, gse = _mean_se(g)
            em_m, em_se = _mean_se(em)
            rel_txt = ("—" if name == "mixed r" or not rel else
                       f"{100 * _mean_se(rel)[0]:+.1f}% ± {100 * _mean_se(rel)[1]:.1f}" if len(rel) > 1
                       else f"{100 * rel[0]:+.1f}% (1 seed)")
            win_txt = "—" if name == "mixed r" or not wins else f"{sum(wins) / len(wins):.1f} of 10"
            logs = paired_logs(by, rank, name)
            log_txt = "—" if name == "mixed r" or len(logs) < 2 else _beyond(logs)
            se = lambda x: "" if math.isnan(x) else f" ± {x:.2f}"  # noqa: E731
            lines.append(f"| {rank} | {name} | {len(have)} | {gm:.2f}{se(gse)} | {rel_txt} | {log_txt} | {win_txt} | "
                         f"{em_m:.3f}{se(em_se) if math.isnan(em_se) else f' ± {em_se:.3f}'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """The map as a picture: paired perplexity change against the same-rank mixed adapter (± 2 SE
    bars) and exact match, against rank (log scale), one line a system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = cells(rows)
    ranks = sorted({k[0] for k in by})
    color = {name: f"C{i}" for i, name in enumerate(("mixed r", *MAP_SYSTEMS))}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, name in enumerate(PLOT_SYSTEMS):
        xs = [r for r in ranks if len(paired_logs(by, r, name)) > 1]
        stats = [_mean_se(paired_logs(by, r, name)) for r in xs]
        if xs:  # nudged sideways so the error bars do not hide each other
            ax1.errorbar([x * 2 ** ((i - 2) * 0.05) for x in xs], [100 * (math.exp(m) - 1) for m, _ in stats],
                         yerr=[200 * se for _, se in stats], marker="o", capsize=3, color=color[name], label=name)
    for name in ("mixed r", *PLOT_SYSTEMS):
        xs = [r for r in ranks if any(name in by[k] for k in by if k[0] == r)]
        ems = [[sum(by[k][name]["em"].values()) / len(by[k][name]["em"]) for k in by if k[0] == r and name in by[k]]
               for r in xs]
        if xs:
            ax2.plot(xs, [sum(e) / len(e) for e in ems], marker="o", color=color[name], label=name)
    ax1.axhline(0, color="grey", lw=1)
    for ax, title in ((ax1, "perplexity vs mixed r (2r for the 2r line), paired (%; ± 2 SE; lower is better)"),
                      (ax2, "exact match, mean over seeds (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("LoRA rank r")
        ax.set_title(title, fontsize=9)
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def stops(rows: list[dict]) -> str:
    """Where early stopping chose each system's checkpoint: median best step of the task adapters
    (and how many were best at their last step: still improving where the cap stopped them) and
    of the mixed adapters, against their caps."""
    lines = []
    for r in sorted(rows, key=lambda r: (r["rank"], r["seed"], SYSTEMS.index(r["system"]))):
        st = r.get("steps") or {}
        own = [v for k, v in st.items() if k not in ("mixed", "trunk", "finetune") and v["best"]]
        tasks = sorted(v["best"] for v in own)
        parts = []
        if tasks:
            last = sum(v["best"] == v["steps"] for v in own)
            parts.append(f"task adapters' best step median {tasks[len(tasks) // 2]} (range {tasks[0]}-{tasks[-1]}; "
                         f"{last} of {len(own)} best at their last step)")
        for k in ("trunk", "mixed", "finetune"):
            if k in st and st[k]["best"]:
                loss = f", validation loss {st[k]['loss']:.3f}" if st[k].get("loss") else ""
                parts.append(f"{k} best {st[k]['best']} of {st[k]['steps']} run{loss}")
        lines.append(f"- rank {r['rank']}, seed {r['seed']}, {r['system']}: " + "; ".join(parts)
                     + f" ({r['train_s'] / 60:.0f} min)")
    return "\n".join(lines)


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"Settings: {meta['settings']}; {meta['machine']}.", f"Command: `{meta['command']}`", ""]
    if not rows:
        return "\n".join(lines + ["No runs recorded yet."])
    lines += ["The map (each routed chain and the rank-10r adapter against the mixed adapter of rank r, paired "
              "over seed x task, ± 1 SE, bold beyond two standard errors; (Ns) = seeds). Answer perplexity "
              "(negative = the system is better):", "", map_table(rows), "",
              "Exact match of greedy answers, difference in points (positive = the system is better):", "",
              map_table(rows, "em"), "",
              findings(rows), "", f"![capacity map]({meta['plot']})", "", "All systems:", "",
              table(rows), "", "Where each adapter stopped (best validation checkpoint):", "", stops(rows)]
    return "\n".join(lines)


def write_results(section: str, key: str, what: str) -> None:
    """Replace this sweep's block of bench/RESULTS.md (its markers), or append it."""
    from results_md import write_section

    write_section(f"capacity-{key}", section, f"### Capacity: rank x system, {what}")
