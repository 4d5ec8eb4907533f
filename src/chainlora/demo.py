"""`chainlora demo`: the main job on the bundled default model and data.

Trains the routed chain's adapters on the ten bundled tasks with the default model (one LoRA
per task, the task-selection LoRA and the mixed baseline; configs/demo.yaml), then shows per
task the test loss of the base model against its task adapter and the mixed adapter, and
answers one held-out instruction per task with the base model and with the task's adapter.
Everything printed is computed here; it is also written to OUT/demo.json. A second run reuses
the trained library.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chainlora import atomic, config, prompts
from chainlora.data import Record, TaskData, load_demo
from chainlora.library import Library, load_adapters, read_manifest
from chainlora.models import load_base
from chainlora.train import train_library

QUICK = ["training.max_steps=3", "training.batch_size=4", "router.training.max_steps=8",
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


def answer(model, tokenizer, text: str, system: str | None, max_new_tokens: int = 32) -> str:
    """Greedy answer to one instruction through the chat template."""
    import torch

    ids = tokenizer(prompts.render(tokenizer, text, system), return_tensors="pt",
                    add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def compare_answers(model, tokenizer, examples: list[Record], system: str | None,
                    console: Console) -> list[dict]:
    """Base model vs the task's own adapter (task given, not routed) on held-out examples."""
    rows = []
    for r in examples:
        model.set_adapter(r.task)
        with model.disable_adapter():
            base_text = answer(model, tokenizer, r.text, system)
        rows.append({"task": r.task, "instruction": r.text, "reference": r.output,
                     "base": base_text, "adapter": answer(model, tokenizer, r.text, system)})
        console.print(f"\n[bold]{r.task}[/bold]  {r.text!r}\n  reference:     {r.output}\n"
                      f"  base model:    {base_text}\n  task adapter:  {rows[-1]['adapter']}")
    return rows


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
    base = load_base(cfg.base_model, dtype=cfg.dtype)
    lib.check_base(base.name, base.fingerprint)
    model = load_adapters(base.model, lib, lib.task_names)
    examples = [tasks[t].test[0] for t in lib.task_names[: 3 if quick else None]]
    answers = compare_answers(model, base.tokenizer, examples, lib.manifest["system_prompt"], console)
    result = {
        "library": str(root),
        "quick": quick,
        "train_seconds": round(train_s, 1),
        "test_loss": {t["name"]: {"base": t["base_test_loss"], "adapter": t["test_loss"]}
                      for t in lib.tasks},
        "mixed_test_loss": lib.mixed["test_loss"] if lib.mixed else None,
        "router_test_loss": lib.router["test_loss"] if lib.router else None,
        "answers": answers,
    }
    atomic.write_json(out / "demo.json", result)
    better = sum(t["test_loss"] < t["base_test_loss"] for t in lib.tasks)
    console.print(f"\n{better}/{len(lib.tasks)} task adapters beat the base model on their task's "
                  f"test loss; library in {root}; wrote {out / 'demo.json'}")
    return result
