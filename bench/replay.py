"""Does replaying other tasks' records in the branches (`chain.replay`) help the chain's task adapters?

Measured on validation records, not on the test split: the demo config trains on a seeded sample
of `--train-per-task` of each task's 800 training records (`data.max_train_per_task`), and the
records left out (up to `--val-per-task` a task) are scored. For each seed, one library per
replay share (the first trained in full; the others are copies retrained with `chainlora train`,
so the trunk and the mixed adapter are kept by their fingerprints and only the branches train).
Selectors are off: the task adapters are scored on their own task's records (oracle routing).

Per task: answer perplexity of the task adapter and of the mixed adapter (the same for every share:
it is kept), and how many tasks each share's adapters beat the mixed adapter on.

    .venv/bin/python bench/replay.py [--shares 0 0.25 0.5] [--seeds 0 1] [--out runs/bench-replay]
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def overrides(seed: int, share: float, train_per_task: int) -> list[str]:
    return [f"training.seed={seed}", f"chain.replay={share}", f"data.max_train_per_task={train_per_task}",
            "router.enabled=false", "classifier.enabled=false", "encoder.enabled=false",
            "selection.enabled=false", "training.save_steps=10000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-per-task", type=int, default=700)
    parser.add_argument("--val-per-task", type=int, default=48)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-replay"))
    args = parser.parse_args()

    from chainlora.eval.evaluate import perplexity, pooled, record_nll
    from chainlora.inference.engine import Engine
    from chainlora.train import config, train_library
    from chainlora.train.plan import load_data, task_splits

    out = Path(args.out)
    rows: dict[tuple[int, float], dict[str, float]] = {}
    mixed: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        first = None
        for share in args.shares:
            cfg = config.load(REPO / "configs" / "demo.yaml", overrides(seed, share, args.train_per_task))
            lib = out / f"s{seed}" / f"replay{share:g}"
            if first is not None and not lib.exists():
                shutil.copytree(first, lib)  # kept pieces (trunk, mixed) by their fingerprints
            train_library(cfg, lib)
            first = first or lib
            data = load_data(cfg)
            _, train, _ = task_splits(cfg, data)
            engine = Engine.load(lib, device="cpu", novelty=False)
            scores = {}
            for t in engine.tasks:
                used = {id(r) for r in train[t]}
                val = [r for r in data[t].train if id(r) not in used][:args.val_per_task]
                scores[t] = perplexity(*pooled(record_nll(engine, val, t)))
                if seed not in mixed or t not in mixed[seed]:
                    mixed.setdefault(seed, {})[t] = perplexity(*pooled(record_nll(engine, val, "mixed")))
            rows[(seed, share)] = scores
            beats = sum(scores[t] < mixed[seed][t] for t in scores)
            print(f"seed {seed} replay {share:g}: beats mixed on {beats} of {len(scores)}", flush=True)

    tasks = list(next(iter(rows.values())))
    geo = lambda xs: math.exp(statistics.mean(math.log(x) for x in xs))  # noqa: E731
    print(f"\n{args.train_per_task} training records a task, {args.val_per_task} validation records a task "
          f"(left out of training), seeds {args.seeds}; answer perplexity, mean over seeds\n")
    print("| task | mixed | " + " | ".join(f"replay {s:g}" for s in args.shares) + " |")
    print("|---|---|" + "---|" * len(args.shares))
    for t in tasks:
        cells = [f"{statistics.mean(rows[(sd, s)][t] for sd in args.seeds):.2f}" for s in args.shares]
        print(f"| {t} | {statistics.mean(mixed[sd][t] for sd in args.seeds):.2f} | " + " | ".join(cells) + " |")
    cells = [f"{statistics.mean(geo(rows[(sd, s)].values()) for sd in args.seeds):.2f}" for s in args.shares]
    print(f"| geometric mean | {statistics.mean(geo(mixed[sd].values()) for sd in args.seeds):.2f} | "
          + " | ".join(cells) + " |")
    cells = [" / ".join(str(sum(rows[(sd, s)][t] < mixed[sd][t] for t in tasks)) for sd in args.seeds)
             for s in args.shares]
    print("| beats mixed on (per seed) | — | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
