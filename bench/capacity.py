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
    .venv/bin/python bench/capacity.py --rslora --ranks 4 16   # the same map at a fixed step size

--rslora is the separate sweep of the rank axis without the step size moving with it: every
adapter at alpha 2 with `lora.use_rslora` (scale 2/sqrt(r): rank 1 as above, rank 16 a quarter of
it), the same-disk adapter at 2/sqrt(10r); its rows, libraries and section are its own
(capacity-rslora-REGIME), so the two maps never mix.
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

from capacity_report import LIB_SYSTEMS, ONE, SYSTEMS, plot, render, write_results

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def sweep_key(regime: int | None, rslora: bool = False) -> str:
    """The name of a sweep's rows, libraries and section: `40`, `all`, `rslora-40`."""
    return f"{'rslora-' if rslora else ''}{regime or 'all'}"


def overrides(rank: int, seed: int, system: str, budget: int, regime: int | None, args) -> list[str]:
    """The demo config at rank r (alpha 2r; --rslora: alpha 2 at scale 2/sqrt(r)), with early
    stopping on every answer adapter."""
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
    if getattr(args, "rslora", False):  # one alpha for every rank and system: the scale is 2/sqrt(rank)
        keys.update({"lora.alpha": 2, "lora.use_rslora": "true"})
    if regime:
        keys["data.max_train_per_task"] = regime
    return [f"{k}={v}" for k, v in keys.items()]


def set_aside(lib: Path) -> None:
    """Move a library and its unfinished run to `.stale-<name>` beside it (kept, never deleted)."""
    for path in (lib, lib.parent / f".{lib.name}.partial"):
        if path.exists():
            shutil.move(path, lib.parent / f".stale-{path.name.lstrip('.')}-{int(time.time())}")


def train(rank: int, seed: int, system: str, budget: int, regime: int | None, args, out: Path) -> tuple[Path, float]:
    from chainlora.train import config, train_library

    lib = out / f"r{rank}-s{seed}" / system
    # A chain starts from a sibling's library: its selector and mixed adapter (and the trunk that
    # warm and residual share) are kept by fingerprint, so only what differs trains.
    siblings = {"warm": ("residual", "none"), "residual": ("warm", "none")}.get(system, ())
    previous = next((s for s in siblings if (lib.parent / s).exists()), None)
    if previous and lib.exists() and not (lib / "trunk").exists() and (lib.parent / previous / "trunk").exists():
        set_aside(lib)  # a copy of none's from before its sibling had a trunk: would train the trunk again
    if previous and not lib.exists():
        shutil.copytree(lib.parent / previous, lib)
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


def backfill(key: str) -> int:
    """Add the best validation loss to recorded rows that predate it, from their libraries under
    runs/bench-capacity-REGIME[-*]/ (rows whose library is gone stay as they are). Rewrites the
    results file: run it when no sweep of this regime is writing. Returns the rows filled."""
    from chainlora import atomic
    from chainlora.library.store import Library

    rows, filled = load(key), 0
    for r in rows:
        if all("loss" in v for v in (r.get("steps") or {}).values()):
            continue
        for lib in saved_libraries(key, r):
            fresh = steps_of(Library.open(lib))
            if {k: v["steps"] for k, v in fresh.items()} == {k: v["steps"] for k, v in r["steps"].items()}:
                r["steps"], filled = fresh, filled + 1  # the same run (same steps): its losses
                break
    if filled:
        atomic.write_text(results_file(key), "".join(json.dumps(r) + "\n" for r in rows))
    return filled


def saved_libraries(key: str, row: dict) -> list[Path]:
    """The row's library in every directory of this sweep: runs/bench-capacity-40 and
    runs/bench-capacity-40-* (another --out), not runs/bench-capacity-400 or -rslora-40."""
    tag, leaf = f"bench-capacity-{key}", f"r{row['rank']}-s{row['seed']}/{row['system']}"
    return sorted(lib for pattern in (tag, f"{tag}-*") for lib in (REPO / "runs").glob(f"{pattern}/{leaf}"))


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
    key = sweep_key(args.regime, args.rslora)
    done = {(r["rank"], r["seed"], r["system"]) for r in load(key) if r["budget"] == args.budget}
    for seed in args.seeds:  # seeds outermost: every rank gets its first seed before any gets a second
        for rank in args.ranks:
            for system in args.systems:
                if (rank, seed, system) in done:
                    continue
                print(f"== regime {args.regime or 'all'}, rank {rank}, seed {seed}, {system}", flush=True)
                lib, seconds = train(rank, seed, system, args.budget, args.regime, args, out)
                row = {"rank": rank, "seed": seed, "system": system, "budget": args.budget,
                       "regime": args.regime, **({"rslora": True} if args.rslora else {}),
                       "train_s": round(seconds, 1),
                       **score(lib, args.per_task, args.max_new_tokens, system)}
                with open(results_file(key), "a") as f:
                    f.write(json.dumps(row) + "\n")


def results_file(key: str) -> Path:
    """Where finished runs are recorded: tracked beside this script (runs/ is not)."""
    return BENCH / f"capacity-{key}.jsonl"


def load(key: str) -> list[dict]:
    path = results_file(key)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regime", type=int, default=40,
                    help="training records a task (default 40: several epochs; 0 = all 800)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS[:4]),
                    help="in this order (warm and residual start from each other's library, else none's); "
                         "mixed10a: the check")
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
    ap.add_argument("--rslora", action="store_true",
                    help="the separate sweep at alpha 2 with lora.use_rslora (scale 2/sqrt r at every rank)")
    ap.add_argument("--render", action="store_true", help="only the tables from saved results")
    ap.add_argument("--backfill", action="store_true",
                    help="first add best validation losses to older rows from their libraries (no sweep running)")
    args = ap.parse_args()
    args.regime = args.regime or None
    if args.rslora and "mixed10a" in args.systems:
        ap.error("mixed10a is the alpha check of the alpha-2r sweep; --rslora fixes alpha for every system")
    key = sweep_key(args.regime, args.rslora)
    out = Path(args.out or REPO / "runs" / f"bench-capacity-{key}")
    out.mkdir(parents=True, exist_ok=True)
    if args.backfill:
        print(f"backfilled {backfill(key)} rows", flush=True)
    if not args.render:
        run(args, out)
    rows = [r for r in load(key) if r["budget"] == args.budget]  # one cap per table
    alpha = "alpha 2 with rsLoRA (scale 2/sqrt r)" if args.rslora else "alpha 2r"
    meta = {"settings": f"configs/demo.yaml (SmolLM2-135M, q/v, {alpha}, batch 8, lr 2e-3), early stopping every "
                        f"{args.eval_steps} steps on {args.validation_per_task} validation records a task (patience "
                        f"{args.patience}), step cap "
                        f"B={args.budget} (tasks B/10 from zero, trunk B/2 + B/20 a branch, mixed B), "
                        f"{args.regime or 'all'} training records a task, "
                        f"{args.per_task} test records a task, {args.max_new_tokens} new tokens",
            "plot": f"capacity-{key}.png",
            "machine": f"{platform.machine()}, {platform.python_version()}, torch CPU",
            "command": " ".join(["python bench/capacity.py",
                                 *(a for a in sys.argv[1:] if a not in ("--render", "--backfill"))])}
    section = render(rows, meta)
    if rows:
        plot(rows, BENCH / meta["plot"])
    write_results(section, key, f"{args.regime or 'all'} training records a task"
                  + (", rsLoRA at alpha 2" if args.rslora else ""))
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
