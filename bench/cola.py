"""Benchmark: COLA (the residual chain) vs plain LoRA at equal optimizer steps and equal rank per link.

For every seed x task x method one task adapter is trained on the default model with `chainlora
train` (same data order, schedule and steps for all methods), then scored on the task's WHOLE
bundled test split: answer perplexity (token-weighted, response tokens only) and exact match of
greedy answers (for `sentiment`, a three-way label, that is classification accuracy).
`--throughput` measures training speed on its own (run it on an idle machine): LoRA and COLA
runs alternate in one process, tokens/s inside trainer.train(), median of paired ratios.

    .venv/bin/python bench/cola.py                      # 3 seeds x 4 tasks x 4 methods, ~1 h on 2 CPU cores
    .venv/bin/python bench/cola.py --seeds 0 --steps 16 # a quick look
    .venv/bin/python bench/cola.py --render             # tables + plot from the saved results only
    .venv/bin/python bench/cola.py --throughput         # COLA/LoRA training speed, ~10 min

Finished runs are kept in --out (results.json), so an interrupted run continues where it stopped.
Writes bench/cola.png and the section between the cola markers of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TASKS = ["antonym", "hypernym", "translate_en_fr", "sentiment"]
METHODS = {  # name -> training overrides; every link has LoRA's rank unless stepped down
    "lora": {"method": "lora"},
    "cola L=2": {"method": "cola", "cola": {"links": 2}},
    "cola L=3": {"method": "cola", "cola": {"links": 3}},
    "cola L=3, r 8/4/2": {"method": "cola", "cola": {"links": 3, "rank_schedule": [8, 4, 2]}},
}
BEGIN, END = "<!-- cola:begin -->", "<!-- cola:end -->"


def config_for(task: str, method: str, seed: int, steps: int) -> dict:
    return {
        "system_prompt": "Answer briefly.", "tasks": [task],
        "data": {"train": "demo", "max_test_per_task": 16},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 2e-3, "lr_scheduler": "cosine",
                     "warmup_ratio": 0.1, "max_length": 96, "seed": seed, "save_steps": 10_000,
                     "logging_steps": 4, **METHODS[method]},
        "router": {"enabled": False}, "classifier": {"enabled": False}, "mixed": {"enabled": False},
    }


def throughput(steps: int, repeats: int, out: Path) -> dict:
    """tokens/s of LoRA and COLA runs alternating on one task; ratios paired per repeat."""
    from chainlora.library import Library
    from chainlora.train import config, train_library

    speed: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(repeats):
        for method in METHODS:
            cfg = config.from_dict(config_for("antonym", method, 0, steps), "bench:throughput")
            lib = train_library(cfg, out / "throughput", force=True)
            entry = Library.open(lib).task("antonym")
            speed[method].append(entry["tokens"] / entry["seconds"])
            print(f"throughput {i + 1}/{repeats} {method}: {speed[method][-1]:.1f} tok/s", flush=True)
    ratios = {m: [c / b for c, b in zip(speed[m], speed["lora"])] for m in METHODS if m != "lora"}
    return {"steps": steps, "repeats": repeats, "tokens_per_s": speed, "ratios": ratios}


def run_one(task: str, method: str, seed: int, steps: int, out: Path) -> dict:
    """Train one adapter, score it on the full test split; return the result row."""
    from chainlora.data import load_demo
    from chainlora.eval import evaluate
    from chainlora.inference.engine import Engine
    from chainlora.train import config, train_library

    name = f"{task}-{method.replace(' ', '').replace('=', '').replace(',', '-').replace('/', '')}-s{seed}"
    cfg = config.from_dict(config_for(task, method, seed, steps), f"bench:{name}")
    lib = train_library(cfg, out / name, force=True)
    engine = Engine.load(lib, device="cpu")
    entry = engine.lib.task(task)
    test = load_demo()[task].test
    nll, tokens = evaluate.pooled(evaluate.record_nll(engine, test, task))
    answers = []
    for i in range(0, len(test), 50):
        answers += engine.generate([r.text for r in test[i:i + 50]], task=task, max_new_tokens=16)
    em = sum(evaluate.exact_match(a.text, r.output) for a, r in zip(answers, test)) / len(test)
    return {"task": task, "method": method, "seed": seed, "steps": steps, "n_test": len(test),
            "perplexity": evaluate.perplexity(nll, tokens), "exact_match": em,
            "train_loss": entry["train_loss"], "tokens_per_s": entry["tokens"] / entry["seconds"],
            "loss_curve": entry["loss_curve"], "cola": entry.get("cola")}


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def render(results: list[dict], meta: dict) -> str:
    """The markdown section for RESULTS.md."""
    seeds = sorted({r["seed"] for r in results})
    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    cell = {}
    for r in results:
        cell.setdefault((r["task"], r["method"]), []).append(r)
    lines = [f"Settings: {meta['settings']}; seeds {seeds}; {meta['machine']}.",
             f"Command: `{meta['command']}`", ""]
    if not results:
        lines.append("No accuracy runs recorded yet (`make bench-cola`).")
    else:
        lines += [
             "Exact match of greedy answers on the whole test split (sentiment: label accuracy), "
             f"mean ± std over {len(seeds)} seed(s); higher is better:", "",
             "| method | " + " | ".join(tasks) + " | mean over tasks |", "|---" * (len(tasks) + 2) + "|"]
    for m in methods if results else []:
        row = [mean_std([r["exact_match"] for r in cell.get((t, m), [])]) for t in tasks]
        per_seed = [statistics.mean(r["exact_match"] for t in tasks for r in cell.get((t, m), []) if r["seed"] == sd)
                    for sd in seeds if all(any(r["seed"] == sd for r in cell.get((t, m), [])) for t in tasks)]
        lines.append(f"| {m} | " + " | ".join(row) + f" | {mean_std(per_seed)} |")
    lines += ["", "Answer perplexity (response tokens, token-weighted) on the same test split; lower is better:", "",
              "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"] if results else []
    for m in methods if results else []:
        lines.append(f"| {m} | " + " | ".join(mean_std([r["perplexity"] for r in cell.get((t, m), [])])
                                             for t in tasks) + " |")
    tp = meta.get("throughput")
    if tp:
        lines += ["", f"Training throughput (`--throughput`: antonym, {tp['steps']} steps, {tp['repeats']} "
                  "alternating repeats, tokens/s inside trainer.train()), COLA / LoRA, median of paired "
                  "ratios; goal >= 0.97:", ""]
        lines += [f"- {m}: {statistics.median(r):.3f} (range {min(r):.3f}-{max(r):.3f}); LoRA "
                  f"{statistics.median(tp['tokens_per_s']['lora']):.0f} tok/s" for m, r in tp["ratios"].items()]
    if results:
        lines += ["", "![COLA vs LoRA training loss](cola.png)"]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Training-loss curves (mean over seeds) per task, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in METHODS:
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["loss_curve"]]
            losses = [statistics.mean(r["loss_curve"][i][1] for r in runs) for i in range(len(steps))]
            ax.plot(steps, losses, label=method)
            for knot in (runs[0]["cola"] or {}).get("knots", []):
                ax.axvline(knot, color=ax.lines[-1].get_color(), alpha=0.15, lw=1)
        ax.set_title(task)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("training loss")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def write_section(text: str) -> None:
    from chainlora import atomic

    results_md = BENCH / "RESULTS.md"
    doc = results_md.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n## COLA vs LoRA (bench/cola.py)\n\n" + block + "\n"
    atomic.write_text(results_md, doc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("runs/bench-cola"))
    p.add_argument("--render", action="store_true", help="only rebuild the tables and plot")
    p.add_argument("--throughput", action="store_true", help="measure COLA/LoRA training speed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print, do not touch bench/RESULTS.md")
    args = p.parse_args()

    from chainlora import atomic

    speed_store = args.out / "throughput.json"
    if args.throughput:
        atomic.write_json(speed_store, throughput(24, args.repeats, args.out))
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else []
    done = {(r["task"], r["method"], r["seed"], r["steps"]) for r in results}
    todo = [(s, t, m) for s in args.seeds for t in args.tasks for m in args.methods
            if (t, m, s, args.steps) not in done]
    t0 = time.perf_counter()
    for i, (seed, task, method) in enumerate([] if args.render or args.throughput else todo, 1):
        row = run_one(task, method, seed, args.steps, args.out)
        results.append(row)
        atomic.write_json(store, results)
        left = (time.perf_counter() - t0) / i * (len(todo) - i)
        print(f"[{i}/{len(todo)}] {task} {method} seed {seed}: exact match {row['exact_match']:.3f}, "
              f"perplexity {row['perplexity']:.3f}, {row['tokens_per_s']:.0f} tok/s; ~{left / 60:.0f} min left",
              flush=True)
    chosen = [r for r in results if r["steps"] == args.steps and r["seed"] in args.seeds
              and r["task"] in args.tasks and r["method"] in args.methods]
    if not chosen and not speed_store.is_file():
        print("no results yet")
        return 1
    meta = {"settings": f"SmolLM2-135M-Instruct fp32, LoRA r=8 alpha=16 on q_proj,v_proj, {args.steps} optimizer "
                        "steps x batch 8, lr 2e-3 cosine (10% warm-up), AdamW; COLA: knots evenly spaced, fresh "
                        "AdamW state per link, no LR restart; demo data (800 train / 150 test per task)",
            "throughput": json.loads(speed_store.read_text()) if speed_store.is_file() else None,
            "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores",
            "command": "make bench-cola  (= .venv/bin/python bench/cola.py --seeds "
                       + " ".join(map(str, args.seeds)) + f" --steps {args.steps})"}
    text = render(chosen, meta)
    print(text)
    if not args.no_write:
        if chosen:
            plot(chosen, BENCH / "cola.png")
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
