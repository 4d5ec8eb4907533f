"""Benchmark: adding a task type — one more adapter for the chain, against what one mixed adapter
must do to learn it (retrain from its start, or continue and forget).

1. A chain library on nine demo tasks (`configs/demo.yaml`, warm branches from a shared trunk,
   its selectors), trained with `chainlora train`; then the tenth task added to that library's
   config and `chainlora train` run again: the plan, its wall time, the steps and examples it
   trained, the nine old adapters checked byte-identical by hash, the new task's answer
   perplexity (its own adapter) and the routing accuracy over all ten tasks after the selectors
   retrained (the library's default selector on the test split).
2. The mixed adapter of the nine tasks (`chainlora finetune`, the compute the nine-task chain
   used), then the tenth task learnt three ways:
   retrain     from its start on all ten tasks, for the ten-task chain's compute;
   continue-1  the nine-task adapter trained on the new task alone, for the steps the new branch took;
   continue-10 the nine-task adapter trained on all ten tasks, for those steps.
   For each: its cost, the new task's perplexity and the nine old tasks' perplexity before and
   after (forgetting), on the same test records.

    .venv/bin/python bench/growth.py                 # about 25 min on a 2-core CPU
    .venv/bin/python bench/growth.py --new rhyme --seed 1
Libraries go to --out (default runs/bench-growth); the measurements to bench/growth.json and
bench/RESULTS.md's growth section.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS_FILE = BENCH / "growth.json"  # tracked: --render works on a fresh checkout


def config(tasks: list[str], seed: int, extra: list[str] = ()):
    from chainlora.train import config as config_

    return config_.load(REPO / "configs" / "demo.yaml",
                        [f"tasks=[{','.join(tasks)}]", f"training.seed={seed}", "mixed.enabled=false",
                         "training.save_steps=10000", *extra])


def tree_sha256(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(f.relative_to(directory).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def chain_steps(lib) -> int:
    return sum(e["steps"] for e in lib.tasks) + (lib.trunk["steps"] if lib.trunk else 0)


def ppl(engine, records, adapter: str | None = None, model=None) -> float:
    from chainlora.inference.scoring import perplexity, pooled, record_nll

    return perplexity(*pooled(record_nll(engine, records, adapter or "mixed", model=model)))


def finetune(tasks: list[str], steps: int, seed: int, out: Path) -> tuple[Path, float]:
    """One adapter on `tasks` for `steps` optimizer steps (`chainlora finetune`)."""
    from chainlora.train import train_library

    t0 = time.perf_counter()
    root = train_library(config(tasks, seed, [f"training.max_steps={steps}", "chain.branch=none"]), out,
                         finetune=True)
    return root, time.perf_counter() - t0


def continue_training(adapter: Path, tasks: list[str], steps: int, seed: int, work: Path):
    """The mixed adapter at `adapter` trained on `tasks` for `steps` more steps, with the demo's
    optimizer settings and a fresh schedule (what a user who continues a LoRA does); returns the
    trained PeftModel and its seconds."""
    from peft import PeftModel
    from transformers import Trainer

    from chainlora.data.examples import answer_pairs, build_dataset, collator
    from chainlora.base_model import load_base
    from chainlora.train.arguments import training_args
    from chainlora.train.plan import Job, load_data, task_splits

    cfg = config(tasks, seed)
    base = load_base(cfg.base_model, dtype=cfg.dtype, device="cpu")
    model = PeftModel.from_pretrained(base.model, str(adapter), is_trainable=True)
    _, train, _ = task_splits(cfg, load_data(cfg))
    pairs = answer_pairs([r for t in tasks for r in train[t]])
    job = Job("mixed", "mixed", "mixed", pairs, [], cfg.training, steps=steps)
    args = training_args(job, work, work / "logs")
    args.report_to, args.disable_tqdm = [], True
    trainer = Trainer(model=model, args=args, data_collator=collator(base.tokenizer),
                      train_dataset=build_dataset(base.tokenizer, pairs, cfg.training.max_length, cfg.system_prompt))
    t0 = time.perf_counter()
    trainer.train()
    return model.eval(), time.perf_counter() - t0


def run(args, out: Path) -> dict:
    from chainlora.data import DEMO_TASKS, load_demo
    from chainlora.inference.engine import Engine
    from chainlora.library import Library
    from chainlora.train import train_library

    demo = load_demo()
    old = [t for t in DEMO_TASKS if t != args.new]
    tests = {t: demo[t].test[:args.per_task] for t in DEMO_TASKS}
    res: dict = {"new": args.new, "seed": args.seed, "per_task": args.per_task}

    # 1. the chain: nine tasks, then the tenth added to the same library
    lib9 = out / "chain"
    t0 = time.perf_counter()
    train_library(config(old, args.seed), lib9, resume=True)
    res["chain9_s"] = round(time.perf_counter() - t0, 1)
    before = {t: tree_sha256(lib9 / "tasks" / t) for t in old}
    steps9 = chain_steps(Library.open(lib9))
    e9 = Engine.load(lib9, device="cpu")
    res["chain9_old_ppl"] = {t: ppl(e9, tests[t], t) for t in old}
    del e9
    grown = out / "chain10"
    if grown.exists():
        shutil.rmtree(grown)
    shutil.copytree(lib9, grown)
    t0 = time.perf_counter()
    train_library(config(list(DEMO_TASKS), args.seed), grown)
    lib10 = Library.open(grown)
    new_entry = lib10.task(args.new)
    per_step = lib10.manifest["training"]["training"]["batch_size"]
    res["chain_add"] = {"seconds": round(time.perf_counter() - t0, 1), "steps": new_entry["steps"],
                        "examples": new_entry["steps"] * per_step,
                        "old_unchanged": sum(tree_sha256(grown / "tasks" / t) == before[t] for t in old),
                        "selection_s": sum((lib10.manifest.get(k) or {}).get("seconds") or 0
                                           for k in ("classifier", "encoder"))}
    engine = Engine.load(grown, device="cpu")
    res["chain_add"]["new_ppl"] = ppl(engine, tests[args.new], args.new)
    res["chain_add"]["old_ppl"] = {t: ppl(engine, tests[t], t) for t in old}
    flat = [r for t in DEMO_TASKS for r in tests[t]]
    routes = engine.route([r.text for r in flat])
    res["chain_add"]["routing_top1"] = sum(rt.task == r.task for rt, r in zip(routes, flat)) / len(flat)
    res["chain_add"]["routed_to_new"] = sum(rt.task == args.new for rt, r in zip(routes, flat) if r.task == args.new) \
        / len(tests[args.new])
    steps10 = chain_steps(lib10)

    # 2. the mixed adapter: nine tasks at the nine-task chain's compute, then three ways to the tenth
    mix9, s9 = finetune(old, steps9, args.seed, out / "mixed9")
    res["mixed9"] = {"steps": steps9, "seconds": round(s9, 1)}
    m9 = Engine.load(mix9, device="cpu")
    name9 = m9.tasks[0]
    res["mixed9"]["old_ppl"] = {t: ppl(m9, tests[t], name9) for t in old}
    res["mixed9"]["new_ppl"] = ppl(m9, tests[args.new], name9)
    mix10, s10 = finetune(list(DEMO_TASKS), steps10, args.seed, out / "mixed10")
    m10 = Engine.load(mix10, device="cpu")
    res["retrain"] = {"steps": steps10, "seconds": round(s10, 1),
                      "new_ppl": ppl(m10, tests[args.new], m10.tasks[0]),
                      "old_ppl": {t: ppl(m10, tests[t], m10.tasks[0]) for t in old}}
    adapter9 = mix9 / Library.open(mix9).tasks[0]["path"]
    for key, tasks in (("continue-1", [args.new]), ("continue-10", list(DEMO_TASKS))):
        model, seconds = continue_training(adapter9, tasks, new_entry["steps"], args.seed, out / f".work-{key}")
        res[key] = {"steps": new_entry["steps"], "seconds": round(seconds, 1),
                    "new_ppl": ppl(engine, tests[args.new], model=model),
                    "old_ppl": {t: ppl(engine, tests[t], model=model) for t in old}}
    return res


def geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def render(res: dict, meta: dict) -> str:
    c, m9 = res["chain_add"], res["mixed9"]
    rows = [("chain: add one adapter", c["steps"], c["seconds"], c["new_ppl"], geomean(c["old_ppl"].values()),
             f"{c['old_unchanged']} of 9 byte-identical"),
            ("mixed: retrain on all ten", res["retrain"]["steps"], res["retrain"]["seconds"], res["retrain"]["new_ppl"],
             geomean(res["retrain"]["old_ppl"].values()), "all weights new"),
            ("mixed: continue on the new task", res["continue-1"]["steps"], res["continue-1"]["seconds"],
             res["continue-1"]["new_ppl"], geomean(res["continue-1"]["old_ppl"].values()), "all weights changed"),
            ("mixed: continue on all ten", res["continue-10"]["steps"], res["continue-10"]["seconds"],
             res["continue-10"]["new_ppl"], geomean(res["continue-10"]["old_ppl"].values()), "all weights changed")]
    old_before = geomean(m9["old_ppl"].values())
    lines = [f"Settings: {meta['settings']}; {meta['machine']}.", f"Command: `{meta['command']}`", "",
             f"New task `{res['new']}`. Before it: the nine-task mixed adapter ({m9['steps']} steps) has old-task "
             f"geomean perplexity {old_before:.2f} and new-task perplexity {m9['new_ppl']:.2f} (never trained on it); "
             f"the nine-task chain's own adapters {geomean(res['chain9_old_ppl'].values()):.2f} on the old tasks. "
             "Seconds: wall time of the whole `chainlora train` / `finetune` run (selectors included), of "
             "`Trainer.train` alone for the two continuations.", "",
             "| how the tenth task is learnt | optimizer steps | seconds | new-task PPL | old tasks' geomean PPL "
             "(change) | old weights |", "|---|---:|---:|---:|---:|---|"]
    for name, steps, secs, new, old_g, note in rows:
        ref = geomean(res["chain9_old_ppl"].values()) if name.startswith("chain") else old_before
        lines.append(f"| {name} | {steps} | {secs:.0f} | {new:.2f} | {old_g:.2f} ({100 * (old_g / ref - 1):+.1f}%) | {note} |")
    lines += ["", f"The chain's growth run: {c['seconds']:.0f} s wall in all, of which the selectors' retraining "
                  f"{c['selection_s']:.0f} s; routing top-1 over all ten tasks afterwards {c['routing_top1']:.1%} "
                  f"(the new task's records routed to it: {c['routed_to_new']:.1%})."]
    return "\n".join(lines)


def write_results(section: str) -> None:
    from results_md import write_section

    write_section("growth", section, "## Growth: a task added to a trained library vs the mixed adapter")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", default="rhyme", help="the task added (one of the ten demo tasks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-task", type=int, default=16, help="test records a task")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-growth"))
    ap.add_argument("--render", action="store_true", help="only the table from saved results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        RESULTS_FILE.write_text(json.dumps(run(args, out), indent=2) + "\n")
    res = json.loads(RESULTS_FILE.read_text())
    meta = {"settings": "configs/demo.yaml (SmolLM2-135M, LoRA r=8 q/v, warm branches, trunk_fraction 0.5, "
                        f"batch 8, lr 2e-3, its classifier and encoder selectors), seed {res['seed']}, "
                        f"{res['per_task']} test records a task",
            "machine": f"{platform.machine()}, {platform.python_version()}, torch CPU",
            "command": " ".join(["python bench/growth.py", *(a for a in sys.argv[1:] if a != "--render")])}
    section = render(res, meta)
    write_results(section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
