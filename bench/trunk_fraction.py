"""How long should the shared trunk be? `chain.trunk_fraction` at a fixed total budget.

The demo config (warm branches, matched mixed adapter) at `--budget` optimizer steps in all
(trunk + ten branches), for each trunk fraction f: the trunk trains f of the budget on all tasks,
each branch (1 - f) / 10 of it on its own task, and the mixed adapter continues the same trunk
for as many steps as the branches together. Fractions whose branch steps are not whole are
rounded (the bench prints the steps each library actually trained).

Measured on validation records, not on the test split (so a fraction chosen here is not tuned
on the demo's test records): every adapter trains on a seeded `--train-per-task` of each task's
800 training records, and the records left out (up to `--val-per-task` a task) are scored, each
by its own task's adapter (oracle routing; selectors are off) and by that library's mixed
adapter. Per fraction: geometric mean answer perplexity of the branches and of the matched mixed
adapter, the tasks where the branch wins, and the paired log-ratio (branch / mixed).

    .venv/bin/python bench/trunk_fraction.py [--fractions 0.25 0.5 0.75] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = 10  # the demo's


def branch_steps(budget: int, fraction: float) -> int:
    """Steps a branch so that trunk + ten branches is `budget` at this trunk fraction."""
    return max(1, round(budget * (1.0 - fraction) / TASKS))


def overrides(seed: int, fraction: float, budget: int, train_per_task: int) -> list[str]:
    return [f"training.seed={seed}", f"chain.trunk_fraction={fraction}", "chain.branch=warm",
            f"training.max_steps={branch_steps(budget, fraction)}", "mixed.budget=matched",
            f"data.max_train_per_task={train_per_task}", "router.enabled=false",
            "classifier.enabled=false", "encoder.enabled=false", "selection.enabled=false",
            "training.save_steps=10000"]


def geo(xs) -> float:
    xs = list(xs)
    return math.exp(statistics.mean(math.log(x) for x in xs))


def spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=80)
    parser.add_argument("--train-per-task", type=int, default=700)
    parser.add_argument("--val-per-task", type=int, default=48)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-trunk-fraction"))
    args = parser.parse_args()

    from chainlora.eval.evaluate import perplexity, pooled, record_nll
    from chainlora.inference.engine import Engine
    from chainlora.library.store import read_manifest
    from chainlora.train import config, train_library
    from chainlora.train.plan import load_data, task_splits

    out = Path(args.out)
    own: dict[tuple[int, float], dict[str, float]] = {}
    mixed: dict[tuple[int, float], dict[str, float]] = {}
    steps: dict[float, str] = {}
    for seed in args.seeds:
        for f in args.fractions:
            cfg = config.load(REPO / "configs" / "demo.yaml", overrides(seed, f, args.budget, args.train_per_task))
            lib = out / f"s{seed}" / f"f{f:g}"
            train_library(cfg, lib)
            manifest = read_manifest(lib)
            steps[f] = (f"trunk {manifest['trunk']['steps']}, branches {manifest['tasks'][0]['steps']} each, "
                        f"mixed {manifest['mixed']['branch']['total_steps']} in all")
            data = load_data(cfg)
            _, train, _ = task_splits(cfg, data)
            engine = Engine.load(lib, device="cpu", novelty=False)
            own[(seed, f)], mixed[(seed, f)] = {}, {}
            for t in engine.tasks:
                used = {id(r) for r in train[t]}
                val = [r for r in data[t].train if id(r) not in used][:args.val_per_task]
                own[(seed, f)][t] = perplexity(*pooled(record_nll(engine, val, t)))
                mixed[(seed, f)][t] = perplexity(*pooled(record_nll(engine, val, "mixed")))
            wins = sum(own[(seed, f)][t] < mixed[(seed, f)][t] for t in engine.tasks)
            print(f"seed {seed} trunk_fraction {f:g} ({steps[f]}): branches {geo(own[(seed, f)].values()):.2f}, "
                  f"mixed {geo(mixed[(seed, f)].values()):.2f}, branches win on {wins} of {len(engine.tasks)}",
                  flush=True)

    tasks = list(next(iter(own.values())))
    print(f"\nbudget {args.budget} steps, warm branches; {args.train_per_task} training records a task, "
          f"{args.val_per_task} validation records a task left out of training; seeds {args.seeds}\n")
    print("| trunk_fraction | steps | branches (geo. mean ppl) | matched mixed | branches win on | paired branch / mixed − 1 |")
    print("|---|---|---|---|---|---|")
    for f in args.fractions:
        g_own = [geo(own[(s, f)].values()) for s in args.seeds]
        g_mix = [geo(mixed[(s, f)].values()) for s in args.seeds]
        wins = [sum(own[(s, f)][t] < mixed[(s, f)][t] for t in tasks) for s in args.seeds]
        logs = [math.log(own[(s, f)][t] / mixed[(s, f)][t]) for s in args.seeds for t in tasks]
        se = statistics.stdev(logs) / math.sqrt(len(logs))
        print(f"| {f:g} | {steps[f]} | {spread(g_own)} | {spread(g_mix)} | "
              f"{spread([float(w) for w in wins])} of {len(tasks)} ({' / '.join(map(str, wins))}) | "
              f"{100 * (math.exp(statistics.mean(logs)) - 1):+.1f}% ± {100 * se:.1f}% (n={len(logs)}) |")
    print("\nper task, mean over seeds (branch / matched mixed):\n")
    print("| task | " + " | ".join(f"f={f:g}" for f in args.fractions) + " |")
    print("|---|" + "---|" * len(args.fractions))
    for t in tasks:
        cells = [f"{statistics.mean(own[(s, f)][t] for s in args.seeds):.2f} / "
                 f"{statistics.mean(mixed[(s, f)][t] for s in args.seeds):.2f}" for f in args.fractions]
        print(f"| {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
