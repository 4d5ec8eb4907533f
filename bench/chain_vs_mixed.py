"""Benchmark: does the routed chain beat one mixed adapter at equal compute, and at what budget?

For every total budget B (optimizer steps of the whole chain; batch 8) and seed, three demo
libraries are trained with `chainlora train` on the bundled ten tasks:

    none      the paper: each task adapter from zero for B/10 steps; mixed from zero for B steps
    warm      a trunk on all tasks for B/2 steps (constant LR); each task continues it for B/20
              steps (decaying LR); the mixed adapter continues the same trunk for B/2 steps
    residual  the same trunk merged into W; a fresh LoRA per task on the residual for B/20 steps

The warm library is a copy of the none library retrained (its selector is kept: same settings),
the residual one a copy of the warm library (trunk and mixed kept): the fingerprints decide, so
identical pieces are never trained twice. Each library is scored with `chainlora eval`'s own
functions on the same test records (16 a task): per-task answer perplexity of own adapter
(oracle routing), mixed and the chain routed as `make demo` routes it (the library's default
selector, measured at train time: the fine-tuned encoder, with its calibrated threshold and the
out-of-library detector; a request it is unsure of is answered by the mixed adapter), and exact
match of greedy answers (12 new tokens). Arrow (PEFT's training-free router) over the none
library's task adapters. The LoRA task-selection router is not trained (the demo does not route
by it; bench/selection.py measures it).

--train-per-task N trains every adapter on N records a task instead of all 800, so the same
budgets reach several epochs (B steps x 8 examples over 10 N records): the multi-epoch regime,
where a mixed adapter may saturate, at CPU cost.

    .venv/bin/python bench/chain_vs_mixed.py                           # 80/160/320/640 x 3 seeds: hours on CPU
    .venv/bin/python bench/chain_vs_mixed.py --budgets 80 160 --seeds 0
    .venv/bin/python bench/chain_vs_mixed.py --train-per-task 40 --out runs/bench-chain-40
    .venv/bin/python bench/chain_vs_mixed.py --render                  # tables + plot from saved results

Finished (budget, seed, system) runs are kept in --out/results.jsonl, so an interrupted sweep
continues where it stopped (a lock refuses a second sweep on the same --out). Writes
bench/chain_vs_mixed[-N].png and the section between the chain-vs-mixed[-N] markers of
bench/RESULTS.md (N = --train-per-task when given).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MODES = ("none", "warm", "residual")
SYSTEMS = ("mixed", "chain none", "mixed (trunk)", "chain warm", "chain residual", "arrow")


def overrides(budget: int, seed: int, mode: str, per_task: int, train_per_task: int | None) -> list[str]:
    """The demo config, at this budget, seed and branch mode; the encoder is the only selector
    (the demo's default; the LoRA router and the classifier are not what routes the demo)."""
    branch_steps = budget // 10 if mode == "none" else budget // 20
    out = [f"training.max_steps={branch_steps}", f"training.seed={seed}", f"chain.branch={mode}",
           "chain.trunk_fraction=0.5", "router.enabled=false", "classifier.enabled=false",
           "encoder.enabled=true", "selection.selectors=[encoder]",
           f"data.max_test_per_task={per_task}", "mixed.budget=matched", "training.save_steps=10000"]
    return out + ([f"data.max_train_per_task={train_per_task}"] if train_per_task else [])


def train(budget: int, seed: int, mode: str, per_task: int, train_per_task: int | None,
          out: Path) -> tuple[Path, float]:
    from chainlora.train import config, train_library

    lib = out / f"B{budget}-s{seed}" / mode
    previous = {"warm": "none", "residual": "warm"}.get(mode)
    if previous and not lib.exists() and (lib.parent / previous).exists():
        shutil.copytree(lib.parent / previous, lib)  # kept pieces (router, trunk, mixed) are reused
    cfg = config.load(REPO / "configs" / "demo.yaml", overrides(budget, seed, mode, per_task, train_per_task))
    t0 = time.perf_counter()
    train_library(cfg, lib)
    return lib, time.perf_counter() - t0


def score(lib: Path, per_task: int, max_new_tokens: int, arrow: bool) -> dict:
    """Table I and exact match for one library, with the eval's own functions; the chain routed
    by the library's default selector, as `make demo` and `chainlora eval` route it."""
    from chainlora.data import load_demo
    from chainlora.eval import evaluate
    from chainlora.inference.engine import Engine

    engine = Engine.load(lib, device="cpu")
    demo = load_demo()
    records = [r for t in engine.tasks for r in demo[t].test[:per_task]]
    ev = evaluate.evaluate(engine, records, per_task=per_task, max_new_tokens=max_new_tokens,
                           selectors=[engine.selector], arrow=arrow)
    return {"perplexity": {r["task"]: {k: r[k] for k in ("own", "mixed", "chain", "arrow", "routed_right")
                                       if k in r} for r in ev["perplexity"]},
            "exact_match": {t: {s: m["exact_match"] for s, m in by.items()} for t, by in ev["metrics"].items()},
            "selector": engine.selector, "top1": ev["selection"][engine.selector]["top1"]}


def run(budgets: list[int], seeds: list[int], per_task: int, train_per_task: int | None, max_new_tokens: int,
        out: Path) -> None:
    lock = open(out / ".lock", "w")
    try:  # one sweep per results directory: a second one would train the same libraries beside it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"{out}: another chain_vs_mixed.py is running on this directory; wait for it or give --out")
    done = {(r["budget"], r["seed"], r["mode"]) for r in load(out)}
    for budget in budgets:
        for seed in seeds:
            for mode in MODES:
                if (budget, seed, mode) in done:
                    continue
                print(f"== budget {budget}, seed {seed}, {mode}", flush=True)
                lib, seconds = train(budget, seed, mode, per_task, train_per_task, out)
                row = {"budget": budget, "seed": seed, "mode": mode, "train_s": round(seconds, 1),
                       **score(lib, per_task, max_new_tokens, arrow=mode == "none")}
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")


def load(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def systems_of(row: dict) -> dict[str, tuple[dict, dict]]:
    """system name -> ({task: perplexity}, {task: exact match}) from one library's row."""
    ppl, em, mode = row["perplexity"], row["exact_match"], row["mode"]
    out = {f"chain {mode}": ({t: v["chain"] for t, v in ppl.items()}, {t: v["chain"] for t, v in em.items()})}
    if mode == "none":
        out["mixed"] = ({t: v["mixed"] for t, v in ppl.items()}, {t: v["mixed"] for t, v in em.items()})
        if all("arrow" in v for v in ppl.values()):
            out["arrow"] = ({t: v["arrow"] for t, v in ppl.items()},
                            {t: v.get("arrow", float("nan")) for t, v in em.items()})
    if mode == "warm":
        out["mixed (trunk)"] = ({t: v["mixed"] for t, v in ppl.items()}, {t: v["mixed"] for t, v in em.items()})
    return out


def geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summary(results: list[dict]) -> dict:
    """(budget, system) -> per-seed geomean perplexity, mean exact match, wins over its mixed."""
    by: dict[tuple[int, str], list[dict]] = {}
    for row in results:
        sys_ = systems_of(row)
        base = {r["mode"]: r for r in results if r["budget"] == row["budget"] and r["seed"] == row["seed"]}
        for name, (ppl, em) in sys_.items():
            ref = None
            if name.startswith("chain") or name == "arrow":  # against the mixed of the same compute
                ref_row = base.get("none" if name in ("chain none", "arrow") else "warm")
                ref = ref_row and {t: v["mixed"] for t, v in ref_row["perplexity"].items()}
            by.setdefault((row["budget"], name), []).append({
                "geomean": geomean(ppl.values()), "em": statistics.mean(em.values()),
                "wins": sum(ppl[t] < ref[t] for t in ppl) if ref else None, "n": len(ppl)})
    return by


def fmt(vals: list[float], spec: str) -> str:
    if not vals:
        return "—"
    m = statistics.mean(vals)
    return f"{m:{spec}}" + (f" ± {statistics.stdev(vals):{spec}}" if len(vals) > 1 else "")


def routing_line(results: list[dict]) -> str:
    """How the chain was routed: the selector, its top-1 and how often a record reached its own adapter."""
    rows = [r for r in results if "selector" in r]
    if not rows:
        return "The chain is routed by the `score` selector (runs recorded before the sweep routed by the default)."
    right = [statistics.mean(v["routed_right"] for v in r["perplexity"].values()) for r in rows]
    return (f"The chain is routed by the library's default selector ({', '.join(sorted({r['selector'] for r in rows}))}"
            f", its threshold and out-of-library detector): top-1 {fmt([r['top1'] for r in rows], '.3f')}, "
            f"records answered by their own task's adapter {fmt(right, '.3f')} (the rest by the mixed adapter "
            "or a wrong one).")


def oracle_table(results: list[dict], budgets: list[int]) -> str:
    """The task adapters with oracle routing (every record on its own task's adapter): what
    specialisation buys with routing taken out, against the mixed adapter of the same compute."""
    lines = ["Oracle routing (every record answered by its own task's adapter), geometric mean and "
             "[tasks where it beats the mixed adapter of the same compute]:", "",
             "| budget (steps) | own none | own warm | own residual |", "|---|---|---|---|"]
    for b in budgets:
        cells = []
        for mode in MODES:
            runs = [r for r in results if r["budget"] == b and r["mode"] == mode]
            ref = {r["seed"]: r for r in results if r["budget"] == b and r["mode"] == ("none" if mode == "none" else "warm")}
            geo = [geomean(v["own"] for v in r["perplexity"].values()) for r in runs]
            wins = [sum(v["own"] < ref[r["seed"]]["perplexity"][t]["mixed"] for t, v in r["perplexity"].items())
                    for r in runs if r["seed"] in ref]
            cells.append(fmt(geo, ".2f") + (f" [{fmt(wins, '.1f')}]" if wins else ""))
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(results: list[dict], meta: dict) -> str:
    by = summary(results)
    budgets = sorted({b for b, _ in by})
    lines = [f"Settings: {meta['settings']}; {meta['machine']}.", f"Command: `{meta['command']}`", ""]
    if not results:
        return "\n".join(lines + ["No runs recorded yet."])
    lines += [routing_line(results), ""]
    if meta.get("records"):
        lines += ["Epochs of the mixed adapter over its training records (B x 8 examples / "
                  f"{meta['records']} records): " + ", ".join(f"{b}: {b * 8 / meta['records']:.2f}"
                                                               for b in sorted({b for b, _ in by})) + ".", ""]
    seeds = sorted({r["seed"] for r in results})
    lines += [f"Geometric mean over the ten tasks of answer perplexity (lower is better), mean ± std over "
              f"seeds {seeds}; in brackets, on how many tasks the system beats the mixed adapter of the same "
              "compute (`chain none`, `arrow` vs `mixed`; `chain warm` / `residual` vs `mixed (trunk)`):", "",
              "| budget (steps) | " + " | ".join(SYSTEMS) + " |", "|---" * (len(SYSTEMS) + 1) + "|"]
    for b in budgets:
        cells = []
        for s in SYSTEMS:
            runs = by.get((b, s), [])
            wins = [r["wins"] for r in runs if r["wins"] is not None]
            cells.append(fmt([r["geomean"] for r in runs], ".2f")
                         + (f" [{fmt(wins, '.1f')} of {runs[0]['n']}]" if wins else ""))
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "Mean exact match of greedy answers over the ten tasks (higher is better):", "",
              "| budget (steps) | " + " | ".join(SYSTEMS) + " |", "|---" * (len(SYSTEMS) + 1) + "|"]
    for b in budgets:
        lines.append(f"| {b} | " + " | ".join(fmt([r["em"] for r in by.get((b, s), [])], ".3f")
                                             for s in SYSTEMS) + " |")
    lines += ["", oracle_table(results, budgets)]
    per_task = [r for r in results if r["budget"] == budgets[-1]]
    if per_task:
        lines += ["", f"Per task at budget {budgets[-1]} (perplexity, mean over seeds):", "",
                  "| task | " + " | ".join(SYSTEMS) + " |", "|---" * (len(SYSTEMS) + 1) + "|"]
        tasks = list(per_task[0]["perplexity"])
        cell: dict[tuple[str, str], list[float]] = {}
        for row in per_task:
            for name, (ppl, _) in systems_of(row).items():
                for t, v in ppl.items():
                    cell.setdefault((t, name), []).append(v)
        for t in tasks:
            lines.append(f"| {t} | " + " | ".join(fmt(cell.get((t, s), []), ".2f") for s in SYSTEMS) + " |")
    lines += ["", f"![chain vs mixed against budget]({meta['plot']})"]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = summary(results)
    budgets = sorted({b for b, _ in by})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for s in SYSTEMS:
        xs = [b for b in budgets if by.get((b, s))]
        if not xs:
            continue
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
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def write_results(section: str, suffix: str) -> None:
    """Replace this sweep's block of bench/RESULTS.md (its markers), or append it (atomically)."""
    begin, end = f"<!-- chain-vs-mixed{suffix}:begin -->", f"<!-- chain-vs-mixed{suffix}:end -->"
    path = BENCH / "RESULTS.md"
    text = path.read_text()
    block = f"{begin}\n{section}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n### Budget sweep on {suffix.strip('-')} records a task\n\n{block}\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[80, 160, 320, 640])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-task", type=int, default=16, help="test records per task")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--train-per-task", type=int, default=None,
                    help="training records a task for every adapter (default: all 800; fewer = more epochs)")
    ap.add_argument("--out", default=None, help="results directory (default runs/bench-chain[-N])")
    ap.add_argument("--render", action="store_true", help="only tables and plot from saved results")
    args = ap.parse_args()
    n = args.train_per_task
    suffix = f"-{n}" if n else ""
    out = Path(args.out or REPO / "runs" / f"bench-chain{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        run(args.budgets, args.seeds, args.per_task, n, args.max_new_tokens, out)
    results = load(out)
    meta = {"settings": f"configs/demo.yaml (SmolLM2-135M, LoRA r=8 q/v, batch 8, lr 2e-3), trunk_fraction 0.5, "
                        f"{n or 'all'} training records a task, {args.per_task} test records a task, "
                        f"{args.max_new_tokens} new tokens",
            "machine": f"{platform.machine()}, {platform.python_version()}, torch CPU",
            "command": "python bench/chain_vs_mixed.py " + " ".join(sys.argv[1:]),
            "records": 10 * (n or 800), "plot": f"chain_vs_mixed{suffix}.png"}
    if results:
        plot(results, BENCH / meta["plot"])
    section = render(results, meta)
    write_results(section, suffix)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
