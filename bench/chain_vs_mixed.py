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
import platform
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MODES = ("none", "warm", "residual")  # the order libraries are trained in (each copies the previous)


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
        shutil.copytree(lib.parent / previous, lib)  # kept pieces (selector, trunk, mixed) are reused
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
    from chainlora.eval import sweep

    return sweep.load(out) if (out / "results.jsonl").exists() else []


def render(results: list[dict], meta: dict) -> str:
    """bench/RESULTS.md's section: settings, how the chain was routed, epochs, the sweep's tables."""
    from chainlora.eval import sweep

    lines = [f"Settings: {meta['settings']}; {meta['machine']}.", f"Command: `{meta['command']}`", ""]
    if not results:
        return "\n".join(lines + ["No runs recorded yet."])
    budgets = sorted({r["budget"] for r in results})
    lines += [sweep.routing_note(results), "",
              f"Epochs of the mixed adapter over its training records (B x 8 examples / {meta['records']} records): "
              + ", ".join(f"{b}: {b * 8 / meta['records']:.2f}" for b in budgets) + ".", "",
              sweep.markdown(sweep.tables(results)), f"![chain vs mixed against budget]({meta['plot']})"]
    return "\n".join(lines)


def write_results(section: str, suffix: str) -> None:
    """Replace this sweep's block of bench/RESULTS.md (its markers), or append it."""
    from results_md import write_section

    write_section(f"chain-vs-mixed{suffix}", section, f"### Budget sweep on {suffix.strip('-')} records a task")


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
            "command": " ".join(["python bench/chain_vs_mixed.py", *(a for a in sys.argv[1:] if a != "--render")]),
            "records": 10 * (n or 800), "plot": f"chain_vs_mixed{suffix}.png"}
    if results:
        from chainlora.eval import sweep

        tmp = BENCH / f".{meta['plot']}.tmp"
        tmp.write_bytes(sweep.plot(results))
        tmp.replace(BENCH / meta["plot"])
    section = render(results, meta)
    write_results(section, suffix)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
