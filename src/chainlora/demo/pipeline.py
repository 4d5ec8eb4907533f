"""`chainlora demo`: the main job on the bundled default model and data.

Trains the routed chain on nine of the ten bundled tasks with the default model (a trunk LoRA,
one branch a task, the classifier and encoder selectors; configs/demo.yaml), then adds the
tenth the way a user grows a library (demo/growth.py: nine adapters kept byte-identical, one
trained, selectors retrained) beside the mixed baseline on all ten. Then evaluates the library
on the test split (`chainlora eval`: Table I, perplexity per task of base / own adapter / mixed
/ chain / Arrow; Table II, each selector's top-1 / top-3 accuracy, held-out templates included;
task metrics), answers one held-out instruction per task with the base model and with the
chain, and writes LIB/report.html. Everything printed is computed here; it is also written to
OUT/demo.json. A second run reuses the trained library.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chainlora import atomic
from chainlora.console import console as make_console
from chainlora.data.records import Record, TaskData, heldout_templates, load_demo
from chainlora.demo import growth
from chainlora.eval import tables
from chainlora.eval.evaluate import evaluate, json_safe, save_eval, selectors_of, system_answers
from chainlora.eval.report import build as build_report
from chainlora.inference.engine import Engine
from chainlora.library.store import Library
from chainlora.train import config

SCORED_PER_TASK = 16  # test records a task the evaluation scores (each task's first); --quick: 4
QUICK_SCORED_PER_TASK = 4
QUICK = ["training.max_steps=2", "training.batch_size=4", "data.max_test_per_task=4",
         "classifier.max_train_per_task=32", "encoder.max_train_per_task=32"]


def demo_config(quick: bool) -> config.Config:
    """The packaged demo config (configs/demo.yaml), shrunk further with --quick."""
    path = Path(str(resources.files("chainlora") / "demo" / "config.yaml"))
    return config.load(path, overrides=QUICK if quick else None)


def data_table(tasks: dict[str, TaskData]) -> Table:
    """Per-task counts and template hold-out of the demo data."""
    table = Table(title="bundled demo data")
    for col in ("task", "train", "test", "templates", "test-only templates"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, d in tasks.items():
        train_t = {r.meta.get("template") for r in d.train}
        test_t = {r.meta.get("template") for r in d.test}
        table.add_row(name, str(len(d.train)), str(len(d.test)), str(len(train_t | test_t)),
                      str(len(test_t - train_t)))
    return table


def loss_table(lib: Library) -> Table:
    """Test loss on each task: base model vs the task's own adapter (answer tokens only)."""
    table = Table(title="test loss per task (lower is better)")
    for col in ("task", "base", "task adapter", "better"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for t in lib.tasks:
        better = t["test_loss"] < t["base_test_loss"]
        table.add_row(t["name"], f"{t['base_test_loss']:.3f}", f"{t['test_loss']:.3f}",
                      "yes" if better else "[red]no[/red]")
    if lib.mixed:
        table.add_row("(mixed, all tasks)", "", f"{lib.mixed['test_loss']:.3f}", "")
    return table


def routed_answers(ev: dict, engine: Engine, shown: list[Record], console: Console) -> list[dict]:
    """The first test instruction of each task: the base model's answer vs the chain's (routed,
    from the evaluation's greedy answers). The base model answers only these: its exact match
    on the test records is 0 on every task, not worth a quarter of the answers' time."""
    bases = [a.text for a in system_answers(engine, shown, ["base"], max_new_tokens=12)["base"]]
    rows = []
    for record, base in zip(shown, bases):
        t, ref = record.task, ev["references"][record.task][0]
        routed, adapter = ev["answers"]["chain"][t][0], ev["routes"][t][0]
        rows.append({"task": t, "instruction": ref["instruction"], "reference": ref["output"], "base": base,
                     "routed_to": adapter, "chain": routed})
        console.print(f"\n[bold]{t}[/bold]  {ref['instruction']!r}\n  reference:   {ref['output']}\n"
                      f"  base model:  {base}\n  chain:       {routed}   [dim](routed to {adapter})[/dim]")
    return rows


def _earlier_growth(out: Path) -> dict | None:
    """The growth an earlier run measured (a second run adds nothing: its library is grown)."""
    import json

    try:
        g = json.loads((out / "demo.json").read_text(encoding="utf-8")).get("growth")
    except (OSError, ValueError, AttributeError):
        return None
    return g if isinstance(g, dict) and "tasks_before" in g else None  # this version's summary only


def run(out: Path, quick: bool = False, console: Console | None = None) -> dict:
    """Train (or reuse) the demo library, show what it learned; write out/demo.json."""
    console = console or make_console()
    # a folder of the user's is refused before any work; an interrupted demo's is continued
    atomic.check_out_dir(out, "demo.json", "a chainlora demo directory",
                         own=("library", ".library.partial", "library-quick", ".library-quick.partial"))
    tasks = load_demo()
    console.print(data_table(tasks))
    cfg = demo_config(quick)
    t0 = time.perf_counter()
    root = out / ("library-quick" if quick else "library")
    # Nine tasks first, then the tenth added (the growth step); an interrupted run is continued,
    # and a second run retrains exactly the adapters whose fingerprint changed.
    measured = growth.train(cfg, root, list(tasks), console)
    grown = measured or _earlier_growth(out)  # a second run repeats what the first measured
    train_s = time.perf_counter() - t0
    lib = Library.open(root)
    console.print(loss_table(lib))
    # The chain routes with the selector `chainlora train` measured best on validation data (no
    # test record decides it); Table II measures them side by side on the test split.
    engine = Engine.load(root)
    per_task = QUICK_SCORED_PER_TASK if quick else SCORED_PER_TASK
    records = [r for t in lib.task_names for r in tasks[t].test[:per_task]]
    t1 = time.perf_counter()
    # Table II without the generate selector, should the router be enabled (the slowest, least
    # accurate one; `chainlora eval` measures it): on a 2-core CPU it alone costs about 3 minutes.
    selectors = [s for s in selectors_of(engine) if s != "generate"]
    ev = evaluate(engine, records, heldout=heldout_templates(tasks), per_task=per_task, max_new_tokens=12,
                  selectors=selectors, answer_systems=("mixed", "chain"))
    if grown:
        ev["growth"] = grown  # the report's growth table
    save_eval(root, "demo", ev, "demo")
    eval_s = time.perf_counter() - t1
    shown = [tasks[t].test[0] for t in lib.task_names[: 3 if quick else None]]  # = each task's first scored record
    answers = routed_answers(ev, engine, shown, console)
    console.print(tables.perplexity(ev))
    console.print(tables.paired_line(ev))
    console.print(tables.exact_match_line(ev))
    console.print(tables.selection(ev))
    result = {
        "library": str(root),
        "quick": quick,
        "train_seconds": round(train_s, 1),
        "test_loss": {t["name"]: {"base": t["base_test_loss"], "adapter": t["test_loss"]}
                      for t in lib.tasks},
        "mixed_test_loss": lib.mixed["test_loss"] if lib.mixed else None,
        "router_test_loss": lib.router["test_loss"] if lib.router else None,
        "eval_seconds": round(eval_s, 1),
        "perplexity": ev["perplexity"], "perplexity_mean": ev["perplexity_mean"],
        "chain_beats_mixed": ev["chain_beats_mixed"], "chain_vs_mixed": tables.paired(ev),
        "chain_beats_arrow": ev.get("chain_beats_arrow"),
        "arrow": ev["arrow"], "selector": ev["selector"],
        "exact_match": tables.exact_match_means(ev), "compute": ev["compute"],
        "selection": {k: {kk: v[kk] for kk in ("top1", "top3", "heldout_top1", "heldout_n", "ms_per_instruction")}
                      for k, v in ev["selection"].items()},
        "answers": answers,
        "growth": grown,
    }
    atomic.write_json(out / "demo.json", json_safe(result))
    if result["growth"]:
        console.print("\n" + growth.line(grown) + ("" if measured else " (measured by the first run)"))
    else:  # a library of an older demo (one stage) in this folder: nothing to repeat
        console.print("\ngrowth: not measured in this folder (its library predates the demo's two stages; "
                      "give --out a new folder to see a task added)")
    report, _ = build_report(root)
    better = sum(t["test_loss"] < t["base_test_loss"] for t in lib.tasks)
    console.print(f"\n{better}/{len(lib.tasks)} task adapters beat the base model on their task's "
                  f"test loss; library in {root}; wrote {out / 'demo.json'}")
    print(f"report: {report}", flush=True)  # plain print: a long path is never wrapped
    return result
