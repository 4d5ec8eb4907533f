"""Does the per-task gate (`chain.gate`) help the routed chain against the mixed adapter?

For each seed, the demo config (configs/demo.yaml: warm branches, 80 optimizer steps a system)
with `chain.gate: true` is trained by `chainlora train`, selectors included, so the chain is routed
by the library's default selector as in `make demo`. The gate held out 32 training records a task
from every adapter and chose, per task, its own adapter or the mixed one on them. The library is
then evaluated on the demo's test records (16 a task, 12 new tokens: the demo's Table I) twice,
with the gate and without it (`--no-gate`: every routed task by its own adapter). Same library,
same routes, so only the gate differs; the mixed adapter is the same in both.

Per seed: which tasks were gated, on how many tasks the chain beats the mixed adapter (strictly;
a gated task ties it), mean and geometric-mean answer perplexity, mean exact match.

    .venv/bin/python bench/gate.py [--seeds 0 1 2] [--out runs/bench-gate] [--render]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def summary(result: dict) -> dict:
    rows = result["perplexity"]
    geo = lambda k: math.exp(statistics.mean(math.log(r[k]) for r in rows))  # noqa: E731
    em = lambda s: statistics.mean(m[s]["exact_match"] for m in result["metrics"].values())  # noqa: E731
    return {"beats": sum(r["chain"] < r["mixed"] for r in rows), "ties": sum(r["chain"] == r["mixed"] for r in rows),
            "chain_mean": result["perplexity_mean"]["chain"], "mixed_mean": result["perplexity_mean"]["mixed"],
            "chain_geo": geo("chain"), "mixed_geo": geo("mixed"), "chain_em": em("chain"), "mixed_em": em("mixed"),
            "per_task": {r["task"]: {"chain": r["chain"], "mixed": r["mixed"]} for r in rows}}


def run_seed(seed: int, out: Path, per_task: int, max_new_tokens: int) -> dict:
    from chainlora.eval.evaluate import evaluate, load_eval_data
    from chainlora.inference.engine import Engine
    from chainlora.train import config, train_library

    cfg = config.load(REPO / "configs" / "demo.yaml", [f"training.seed={seed}", "chain.gate=true"])
    lib = train_library(cfg, out / f"s{seed}")
    records, heldout, _ = load_eval_data("demo")
    row: dict = {"seed": seed}
    for gated in (True, False):
        engine = Engine.load(lib, device="cpu", gate=gated)
        result = evaluate(engine, records, heldout=heldout, per_task=per_task, max_new_tokens=max_new_tokens,
                          selectors=[engine.selector], arrow=False)
        row["gate" if gated else "no gate"] = summary(result)
        row["selector"], row["measured"] = engine.selector, engine.lib.manifest["gate"]["tasks"]
        del engine
    return row


def report(rows: list[dict]) -> str:
    def ms(vals: list[float], spec: str) -> str:
        return f"{statistics.mean(vals):{spec}} ± {statistics.stdev(vals):{spec}}" if len(vals) > 1 else f"{vals[0]:{spec}}"

    lines = [f"seeds {[r['seed'] for r in rows]}; chain routed by the library's default selector "
             f"({', '.join(sorted({r['selector'] for r in rows}))})", "",
             "| seed | gated tasks (mixed answers them) |", "|---|---|"]
    lines += [f"| {r['seed']} | {', '.join(t for t, v in r['measured'].items() if v['serve'] == 'mixed') or '—'} |"
              for r in rows]
    lines += ["", "| system | beats mixed on | ties | mean perplexity | geometric mean | mean exact match |",
              "|---|---|---|---|---|---|"]
    first = rows[0]["gate"]
    lines.append(f"| mixed adapter | — | — | {ms([r['gate']['mixed_mean'] for r in rows], '.2f')} | "
                 f"{ms([r['gate']['mixed_geo'] for r in rows], '.2f')} | {ms([r['gate']['mixed_em'] for r in rows], '.3f')} |")
    for side in ("no gate", "gate"):
        s = [r[side] for r in rows]
        lines.append(f"| chain, {side} | {ms([x['beats'] for x in s], '.1f')} of {len(first['per_task'])} | "
                     f"{ms([x['ties'] for x in s], '.1f')} | {ms([x['chain_mean'] for x in s], '.2f')} | "
                     f"{ms([x['chain_geo'] for x in s], '.2f')} | {ms([x['chain_em'] for x in s], '.3f')} |")
    right = []
    for r in rows:  # the gate's choice against what the test split says (the ungated chain vs mixed)
        test = r["no gate"]["per_task"]
        right.append(sum((v["serve"] == "mixed") == (test[t]["chain"] >= test[t]["mixed"]) for t, v in r["measured"].items()))
    lines += ["", "The gate chose the adapter that is better on the test split on "
              + " / ".join(f"{n} of {len(r['measured'])}" for n, r in zip(right, rows)) + " tasks (per seed)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-gate"))
    parser.add_argument("--render", action="store_true", help="only the tables, from --out/results.json")
    args = parser.parse_args()
    from chainlora import atomic

    out = Path(args.out)
    if args.render:
        print(report(json.loads((out / "results.json").read_text())))
        return
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, out, args.per_task, args.max_new_tokens))
        atomic.write_json(out / "results.json", rows)
        print(report(rows), flush=True)
    print("\n" + report(rows))


if __name__ == "__main__":
    main()
