"""`chainlora demo`: the main job on the bundled default model and data.

Trains the routed chain's adapters on the ten bundled tasks with the default model (one LoRA
per task, the task-selection LoRA and the mixed baseline; configs/demo.yaml), then shows per
task the test loss of the base model against its task adapter, the task selectors' top-1 /
top-3 accuracy on the test split (held-out templates included), and answers one held-out
instruction per task with the base model and with the chain (routed, one batch).
Everything printed is computed here; it is also written to OUT/demo.json. A second run reuses
the trained library.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chainlora import atomic, config
from chainlora.data import Record, TaskData, load_demo
from chainlora.engine import BASE, Chain
from chainlora.evaluate import selection_accuracy
from chainlora.library import Library, read_manifest
from chainlora.train import train_library

QUICK = ["training.max_steps=3", "training.batch_size=4", "router.training.max_steps=16",
         "data.max_test_per_task=8"]


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


def selector_table(scores: list) -> Table:
    table = Table(title="task selection on the test split (held-out templates included)")
    for col in ("selector", "n", "top-1", "top-3", "top-1 held-out templates", "ms / instruction"):
        table.add_column(col, justify="left" if col == "selector" else "right")
    for s in scores:
        table.add_row(s.selector, str(s.n), f"{s.top1:.1%}", f"{s.top3:.1%}",
                      f"{s.heldout_top1:.1%} of {s.heldout_n}", f"{s.ms_per_instruction:.0f}")
    return table


def routed_answers(chain: Chain, examples: list[Record], console: Console) -> list[dict]:
    """One held-out instruction per task: base model vs the chain (routed), one batch each."""
    texts = [r.text for r in examples]
    base = chain.generate(texts, task=BASE, max_new_tokens=32)
    routed = chain.generate(texts, max_new_tokens=32)
    rows = []
    for r, b, a in zip(examples, base, routed):
        rows.append({"task": r.task, "instruction": r.text, "reference": r.output, "base": b.text,
                     "routed_to": a.route.adapter, "probability": round(a.route.probability, 4),
                     "chain": a.text})
        console.print(f"\n[bold]{r.task}[/bold]  {r.text!r}\n  reference:   {r.output}\n"
                      f"  base model:  {b.text}\n  chain:       {a.text}   "
                      f"[dim](routed to {a.route.adapter}, p={a.route.probability:.2f})[/dim]")
    return rows


def heldout_templates(tasks: dict[str, TaskData]) -> dict[str, set]:
    """Per task, the templates that occur only in the test split."""
    return {t: {r.meta.get("template") for r in d.test} - {r.meta.get("template") for r in d.train}
            for t, d in tasks.items()}


def run(out: Path, quick: bool = False, console: Console | None = None) -> dict:
    """Train (or reuse) the demo library, show what it learned; write out/demo.json."""
    console = console or Console()
    tasks = load_demo()
    console.print(data_table(tasks))
    cfg = demo_config(quick)
    t0 = time.perf_counter()
    root = out / ("library-quick" if quick else "library")
    # The demo owns its library: continue an interrupted run, retrain when the config changed.
    previous = read_manifest(root) if root.is_dir() else None
    stale = previous is not None and previous.get("config_sha256") != cfg.digest()
    train_library(cfg, root, resume=True, force=stale)
    train_s = time.perf_counter() - t0
    lib = Library.open(root)
    console.print(loss_table(lib))
    chain = Chain.load(root)
    per_task = 4 if quick else 16  # instructions per task for the selector accuracy
    eval_records = [r for t in lib.task_names for r in tasks[t].test[:per_task]]
    scores = [selection_accuracy(chain, eval_records, sel, heldout_templates(tasks))
              for sel in ("score", "generate") + (("classifier",) if lib.classifier else ())]
    console.print(selector_table(scores))
    examples = [tasks[t].test[0] for t in lib.task_names[: 3 if quick else None]]
    answers = routed_answers(chain, examples, console)
    result = {
        "library": str(root),
        "quick": quick,
        "train_seconds": round(train_s, 1),
        "test_loss": {t["name"]: {"base": t["base_test_loss"], "adapter": t["test_loss"]}
                      for t in lib.tasks},
        "mixed_test_loss": lib.mixed["test_loss"] if lib.mixed else None,
        "router_test_loss": lib.router["test_loss"] if lib.router else None,
        "selection": [sc.to_dict() for sc in scores],
        "answers": answers,
    }
    atomic.write_json(out / "demo.json", result)
    better = sum(t["test_loss"] < t["base_test_loss"] for t in lib.tasks)
    console.print(f"\n{better}/{len(lib.tasks)} task adapters beat the base model on their task's "
                  f"test loss; library in {root}; wrote {out / 'demo.json'}")
    return result
