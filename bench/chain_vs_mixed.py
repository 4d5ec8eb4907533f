"""Benchmark: does the routed chain beat one mixed adapter at equal compute, and at what budget?

For every total budget B (optimizer steps of the whole chain; batch 8) and seed, three demo
libraries are trained with `chainlora train` on the bundled ten tasks:

    none      the paper: each task adapter from zero for B/10 steps; mixed from zero for B steps
    warm      a trunk on all tasks for B/2 steps (constant LR); each task continues it for B/20
              steps (decaying LR); the mixed adapter continues the same trunk for B/2 steps
    residual  the same trunk merged into W; a fresh LoRA per task on the residual for B/20 steps

The warm library is a copy of the none library retrained (its router is kept: same settings),
the residual one a copy of the warm library (trunk and mixed kept): the fingerprints decide, so
identical pieces are never trained twice. Each library is scored with `chainlora eval`'s own
functions on the same test records (16 a task): per-task answer perplexity of own adapter
(oracle routing), mixed and the chain routed by the default `score` selector, and exact match
of greedy answers (12 new tokens). Arrow (PEFT's training-free router) over the none library's
task adapters when chainlora.eval supports it.

    .venv/bin/python bench/chain_vs_mixed.py                           # 80/160/320/640 x 3 seeds: hours on CPU
    .venv/bin/python bench/chain_vs_mixed.py --budgets 80 160 --seeds 0
    .venv/bin/python bench/chain_vs_mixed.py --render                  # tables + plot from saved results

Finished (budget, seed, system) runs are kept in --out/results.jsonl, so an interrupted sweep
continues where it stopped. Writes bench/chain_vs_mixed.png and the section between the
chain-vs-mixed markers of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
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
BEGIN, END = "<!-- chain-vs-mixed:begin -->", "<!-- chain-vs-mixed:end -->"
SYSTEMS = ("mixed", "chain none", "mixed (trunk)", "chain warm", "chain residual", "arrow")


def overrides(budget: int, seed: int, mode: str, per_task: int) -> list[str]:
    """The demo config, at this budget, seed and branch mode (classifier off: not measured here)."""
    branch_steps = budget // 10 if mode == "none" else budget // 20
    return [f"training.max_steps={branch_steps}", f"training.seed={seed}", f"chain.branch={mode}",
            "chain.trunk_fraction=0.5", "classifier.enabled=false", "router.training.max_steps=40",
            f"data.max_test_per_task={per_task}", "mixed.budget=matched", "training.save_steps=10000"]


def train(budget: int, seed: int, mode: str, per_task: int, out: Path) -> tuple[Path, float]:
    from chainlora.train import config, train_library

    lib = out / f"B{budget}-s{seed}" / mode
    previous = {"warm": "none", "residual": "warm"}.get(mode)
    if previous and not lib.exists() and (lib.parent / previous).exists():
        shutil.copytree(lib.parent / previous, lib)  # kept pieces (router, trunk, mixed) are reused
    cfg = config.load(REPO / "configs" / "demo.yaml", overrides(budget, seed, mode, per_task))
    t0 = time.perf_counter()
    train_library(cfg, lib)
    return lib, time.perf_counter() - t0


def score(lib: Path, per_task: int, max_new_tokens: int, arrow: bool) -> dict:
    """Table I and exact match for one library, with the eval's own functions."""
    import inspect

    from chainlora.data import load_demo
    from chainlora.eval import evaluate
    from chainlora.inference.engine import Engine

    engine = Engine.load(lib, device="cpu")
    demo = load_demo()
    records = [r for t in engine.tasks for r in demo[t].test[:per_task]]
    kw = {"arrow": arrow} if "arrow" in inspect.signature(evaluate.evaluate).parameters else {}
    ev = evaluate.evaluate(engine, records, per_task=per_task, max_new_tokens=max_new_tokens,
                           selectors=["score"], **kw)
    return {"perplexity": {r["task"]: {k: r[k] for k in ("own", "mixed", "chain", "arrow", "routed_right")
                                       if k in r} for r in ev["perplexity"]},
            "exact_match": {t: {s: m["exact_match"] for s, m in by.items()} for t, by in ev["metrics"].items()},
            "top1": ev["selection"]["score"]["top1"]}


def run(budgets: list[int], seeds: list[int], per_task: int, max_new_tokens: int, out: Path) -> None:
    done = {(r["budget"], r["seed"], r["mode"]) for r in load(out)}
    for budget in budgets:
        for seed in seeds:
            for mode in MODES:
                if (budget, seed, mode) in done:
                    continue
                print(f"== budget {budget}, seed {seed}, {mode}", flush=True)
                lib, seconds = train(budget, seed, mode, per_task, out)
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


def render(results: list[dict], meta: dict) -> str:
    by = summary(results)
    budgets = sorted({b for b, _ in by})
    lines = [f"Settings: {meta['settings']}; {meta['machine']}.", f"Command: `{meta['command']}`", ""]
    if not results:
        return "\n".join(lines + ["No runs recorded yet."])
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
    lines += ["", "![chain vs mixed against budget](chain_vs_mixed.png)"]
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


def write_results(section: str) -> None:
    path = BENCH / "RESULTS.md"
    text = path.read_text()
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text += f"\n## Routed chain vs mixed adapter, budget sweep — `bench/chain_vs_mixed.py`\n\n{block}\n"
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[80, 160, 320, 640])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-task", type=int, default=16, help="test records per task")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-chain"))
    ap.add_argument("--render", action="store_true", help="only tables and plot from saved results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        run(args.budgets, args.seeds, args.per_task, args.max_new_tokens, out)
    results = load(out)
    meta = {"settings": f"configs/demo.yaml (SmolLM2-135M, LoRA r=8 q/v, batch 8, lr 2e-3), trunk_fraction 0.5, "
                        f"router 40 steps, {args.per_task} test records a task, {args.max_new_tokens} new tokens",
            "machine": f"{platform.machine()}, {platform.python_version()}, torch CPU",
            "command": "python bench/chain_vs_mixed.py " + " ".join(sys.argv[1:])}
    if results:
        plot(results, BENCH / "chain_vs_mixed.png")
    section = render(results, meta)
    write_results(section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
