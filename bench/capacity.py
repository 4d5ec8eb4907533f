"""Benchmark: the paper's capacity argument — does the chain pull ahead of one mixed adapter when
the adapters are small (LoRA rank) and every system stops at its own best validation loss?

For each data regime, rank r and seed, four libraries on the bundled ten demo tasks, every adapter
trained with `training.early_stopping` (a checkpoint every --eval-steps, the one with the lowest
loss on validation records held out of ALL training kept; the test split decides nothing):

    none      the paper's chain: each task adapter from zero (cap B/10 steps), rank r;
              its library's mixed adapter, from zero at rank r (cap B)
    warm      a trunk on all tasks (cap B/2) continued per task (cap B/20), rank r; its mixed
              adapter continues the same trunk (cap B in all)
    residual  the same trunk merged into W, a fresh rank-r LoRA per task (cap B/20)
    mixed10   ONE adapter on all tasks at rank 10 r (`chainlora finetune`): the chain's disk (cap B)
    mixed10a  the same with the rank-r adapters' alpha (2r, not 20r): its update a step the size of a
              rank-r adapter's (fixed alpha, as "LoRA Without Regret" scales rank); not in the default
              --systems, a check that mixed10's showing at high rank is not its learning rate

The caps are room, not budgets: with --patience an adapter stops after that many evaluations
without a new best, and the checkpoint kept is its best (a cap an adapter was still improving
at shows in the "where each adapter stopped" list: then the cap, not the system, decided).

Each is scored on the same test records (--per-task a task): answer perplexity per task and exact
match of greedy answers, for the chain routed as `make demo` routes it (the library's measured
default selector, its threshold and out-of-library detector) and with oracle routing (each task's
own adapter). Finished runs are kept in bench/capacity-REGIME.jsonl, in the repository, so a
later checkout continues the sweep where it stopped (the libraries themselves go to --out and
are not kept; one sweep a directory), and --render writes bench/RESULTS.md's capacity section.

    .venv/bin/python bench/capacity.py --regime 40 --ranks 1 16 --seeds 0      # the first cells
    .venv/bin/python bench/capacity.py                                          # everything (days on CPU)
    .venv/bin/python bench/capacity.py --render
    .venv/bin/python bench/capacity.py --render --backfill   # older rows: validation losses from runs/
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SYSTEMS = ("none", "warm", "residual", "mixed10", "mixed10a")  # training order: warm copies none, residual warm
ONE = {"mixed10": "mixed10", "mixed10a": "mixed10 (alpha 2r)"}  # the one-adapter systems and their labels
LIB_SYSTEMS = ("mixed", "own", "chain")  # what each chain library reports (mixed r, oracle, routed)
BEST_ALPHA = "mixed10 (validation's alpha)"  # of mixed10 / mixed10a, the lower best validation loss
RESIDUAL, RESIDUAL_2R = "residual routed", "residual routed vs mixed 2r"  # a residual branch serves at rank 2r
# the map's rows: what a user deploys, each against the mixed adapter (and the plot's lines)
MAP_SYSTEMS = ("none routed", "warm routed", RESIDUAL, RESIDUAL_2R, "mixed10", "mixed10 (alpha 2r)", BEST_ALPHA)
PLOT_SYSTEMS = ("none routed", "warm routed", RESIDUAL, RESIDUAL_2R, "mixed10")


def overrides(rank: int, seed: int, system: str, budget: int, regime: int | None, args) -> list[str]:
    """The demo config at rank r (alpha 2r), with early stopping on every answer adapter."""
    keys = {"lora.r": rank, "lora.alpha": 2 * rank, "training.seed": seed, "training.save_steps": 10000,
            "training.early_stopping.enabled": "true", "training.early_stopping.eval_steps": args.eval_steps,
            "training.early_stopping.validation_per_task": args.validation_per_task,
            "training.early_stopping.patience": args.patience,
            "data.max_test_per_task": args.per_task, "router.enabled": "false", "classifier.enabled": "false",
            "encoder.enabled": "true", "selection.selectors": "[encoder]",
            "training.max_steps": budget // 10 if system == "none" else budget // 20,
            "chain.branch": system, "chain.trunk_fraction": 0.5, "mixed.budget": budget}
    if system in ONE:  # one adapter on every task: the chain's ten rank-r adapters' disk at rank 10 r
        keys.update({"lora.r": 10 * rank, "lora.alpha": (20 if system == "mixed10" else 2) * rank,
                     "training.max_steps": budget,
                     "chain.branch": "none", "mixed.enabled": "false"})
    if regime:
        keys["data.max_train_per_task"] = regime
    return [f"{k}={v}" for k, v in keys.items()]


def train(rank: int, seed: int, system: str, budget: int, regime: int | None, args, out: Path) -> tuple[Path, float]:
    from chainlora.train import config, train_library

    lib = out / f"r{rank}-s{seed}" / system
    previous = {"warm": "none", "residual": "warm"}.get(system)
    if previous and not lib.exists() and (lib.parent / previous).exists():
        shutil.copytree(lib.parent / previous, lib)  # its selector (and trunk, mixed) are kept by fingerprint
    cfg = config.load(REPO / "configs" / "demo.yaml", overrides(rank, seed, system, budget, regime, args))
    t0 = time.perf_counter()
    train_library(cfg, lib, finetune=system in ONE, resume=True)  # a killed sweep continues its adapter
    return lib, time.perf_counter() - t0


def steps_of(lib) -> dict:
    """Optimizer steps each system ran, and where each adapter's best checkpoint was."""
    entries = lib.tasks + ([lib.trunk] if lib.trunk else []) + ([lib.mixed] if lib.mixed else [])
    return {e["name"]: {"steps": e.get("steps"), "best": (e.get("early_stopping") or {}).get("best_step"),
                        "loss": (e.get("early_stopping") or {}).get("best_validation_loss")}
            for e in entries}


def backfill(regime: int | None) -> int:
    """Add the best validation loss to recorded rows that predate it, from their libraries under
    runs/bench-capacity-REGIME*/ (rows whose library is gone stay as they are). Rewrites the
    results file: run it when no sweep of this regime is writing. Returns the rows filled."""
    from chainlora import atomic
    from chainlora.library.store import Library

    rows, filled = load(regime), 0
    for r in rows:
        if all("loss" in v for v in (r.get("steps") or {}).values()):
            continue
        for lib in sorted(REPO.glob(f"runs/bench-capacity-{regime or 'all'}*/r{r['rank']}-s{r['seed']}/{r['system']}")):
            fresh = steps_of(Library.open(lib))
            if {k: v["steps"] for k, v in fresh.items()} == {k: v["steps"] for k, v in r["steps"].items()}:
                r["steps"], filled = fresh, filled + 1  # the same run (same steps): its losses
                break
    if filled:
        atomic.write_text(results_file(regime), "".join(json.dumps(r) + "\n" for r in rows))
    return filled


def score(lib_dir: Path, per_task: int, max_new_tokens: int, system: str) -> dict:
    """Per task: perplexity and exact match of mixed (rank r), own (oracle) and the routed chain —
    or, for mixed10 / mixed10a, of its one adapter."""
    from chainlora.data import load_demo
    from chainlora.eval import evaluate
    from chainlora.inference.engine import Engine
    from chainlora.inference.scoring import perplexity, pooled, record_nll

    engine = Engine.load(lib_dir, device="cpu")
    demo = load_demo()
    if system in ONE:
        (name,) = engine.tasks
        tasks = sorted(t for t in demo)
        ppl, em = {}, {}
        for t in tasks:
            records = demo[t].test[:per_task]
            ppl[t] = {system: perplexity(*pooled(record_nll(engine, records, name)))}
            answers = engine.generate([r.text for r in records], task=name, max_new_tokens=max_new_tokens)
            em[t] = {system: sum(evaluate.exact_match(a.text, r.output) for a, r in zip(answers, records))
                     / len(records)}
        return {"perplexity": ppl, "exact_match": em, "steps": steps_of(engine.lib)}
    records = [r for t in engine.tasks for r in demo[t].test[:per_task]]
    ev = evaluate.evaluate(engine, records, per_task=per_task, max_new_tokens=max_new_tokens,
                           selectors=[engine.selector], arrow=False)
    # the chain with oracle routing is `own`; the routed chain's exact match is `chain`
    oracle = {t: {"own": sum(evaluate.exact_match(a.text, r.output) for a, r in zip(
        engine.generate([r.text for r in rs], task=t, max_new_tokens=max_new_tokens), rs)) / len(rs)}
        for t in engine.tasks for rs in [demo[t].test[:per_task]]}
    return {"perplexity": {r["task"]: {k: r[k] for k in LIB_SYSTEMS} for r in ev["perplexity"]},
            "exact_match": {t: {"mixed": m["mixed"]["exact_match"], "chain": m["chain"]["exact_match"],
                                **oracle[t]} for t, m in ev["metrics"].items()},
            "selector": engine.selector, "top1": ev["selection"][engine.selector]["top1"],
            "steps": steps_of(engine.lib)}


def run(args, out: Path) -> None:
    lock = open(out / ".lock", "w")
    try:  # one sweep per results directory
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"{out}: another capacity.py is running on this directory; wait for it or give --out")
    done = {(r["rank"], r["seed"], r["system"]) for r in load(args.regime) if r["budget"] == args.budget}
    for seed in args.seeds:  # seeds outermost: every rank gets its first seed before any gets a second
        for rank in args.ranks:
            for system in args.systems:
                if (rank, seed, system) in done:
                    continue
                print(f"== regime {args.regime or 'all'}, rank {rank}, seed {seed}, {system}", flush=True)
                lib, seconds = train(rank, seed, system, args.budget, args.regime, args, out)
                row = {"rank": rank, "seed": seed, "system": system, "budget": args.budget,
                       "regime": args.regime, "train_s": round(seconds, 1),
                       **score(lib, args.per_task, args.max_new_tokens, system)}
                with open(results_file(args.regime), "a") as f:
                    f.write(json.dumps(row) + "\n")


def results_file(regime: int | None) -> Path:
    """Where finished runs are recorded: tracked beside this script (runs/ is not)."""
    return BENCH / f"capacity-{regime or 'all'}.jsonl"


def load(regime: int | None) -> list[dict]:
    path = results_file(regime)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# --------------------------------------------------------------------------- tables


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
    order = ["mixed r", "mixed r (trunk)", "mixed10", "mixed10 (alpha 2r)", BEST_ALPHA, "none oracle", "none routed", "warm oracle", "warm routed",
             "residual oracle", "residual routed"]
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
    and of the mixed adapters, against their caps."""
    lines = []
    for r in sorted(rows, key=lambda r: (r["rank"], r["seed"], SYSTEMS.index(r["system"]))):
        st = r.get("steps") or {}
        tasks = sorted(v["best"] for k, v in st.items() if k not in ("mixed", "trunk", "finetune") and v["best"])
        parts = []
        if tasks:
            parts.append(f"task adapters' best step median {tasks[len(tasks) // 2]} (range {tasks[0]}-{tasks[-1]})")
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


def write_results(section: str, regime: int | None) -> None:
    """Replace this regime's block of bench/RESULTS.md (its markers), or append it."""
    from results_md import write_section

    write_section(f"capacity-{regime or 'all'}", section,
                  f"### Capacity: rank x system, {regime or 'all'} training records a task")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regime", type=int, default=40,
                    help="training records a task (default 40: several epochs; 0 = all 800)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS[:4]),
                    help="in this order (warm copies none's library, residual warm's); mixed10a: the check")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=640,
                    help="step cap B of every system: tasks B/10 from zero, or trunk B/2 + B/20 a task; mixed B")
    ap.add_argument("--eval-steps", type=int, default=10)
    ap.add_argument("--validation-per-task", type=int, default=8)
    ap.add_argument("--patience", type=int, default=4,
                    help="evaluations without a new best before an adapter stops (its best is kept)")
    ap.add_argument("--per-task", type=int, default=16, help="test records a task")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--out", default=None, help="results directory (default runs/bench-capacity-REGIME)")
    ap.add_argument("--render", action="store_true", help="only the tables from saved results")
    ap.add_argument("--backfill", action="store_true",
                    help="first add best validation losses to older rows from their libraries (no sweep running)")
    args = ap.parse_args()
    args.regime = args.regime or None
    out = Path(args.out or REPO / "runs" / f"bench-capacity-{args.regime or 'all'}")
    out.mkdir(parents=True, exist_ok=True)
    if args.backfill:
        print(f"backfilled {backfill(args.regime)} rows", flush=True)
    if not args.render:
        run(args, out)
    rows = [r for r in load(args.regime) if r["budget"] == args.budget]  # one cap per table
    meta = {"settings": f"configs/demo.yaml (SmolLM2-135M, q/v, alpha 2r, batch 8, lr 2e-3), early stopping every "
                        f"{args.eval_steps} steps on {args.validation_per_task} validation records a task (patience "
                        f"{args.patience}), step cap "
                        f"B={args.budget} (tasks B/10 from zero, trunk B/2 + B/20 a branch, mixed B), {args.regime or 'all'} training records a task, "
                        f"{args.per_task} test records a task, {args.max_new_tokens} new tokens",
            "plot": f"capacity-{args.regime or 'all'}.png",
            "machine": f"{platform.machine()}, {platform.python_version()}, torch CPU",
            "command": " ".join(["python bench/capacity.py",
                                 *(a for a in sys.argv[1:] if a not in ("--render", "--backfill"))])}
    section = render(rows, meta)
    if rows:
        plot(rows, BENCH / meta["plot"])
    write_results(section, args.regime)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
