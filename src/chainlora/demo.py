"""`chainlora demo`: the main job on the bundled default model and data.

Today it loads the default base model, shows the bundled ten-task data, and answers held-out
test instructions zero-shot with the base model next to their references — the "before"
picture that task adapters and routing improve on. Everything
printed is computed here; results are also written to OUT/demo.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chainlora import atomic, prompts
from chainlora.data import Record, TaskData, load_demo
from chainlora.models import DEFAULT_MODEL, Base, load_base


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


def answer(base: Base, record: Record, max_new_tokens: int = 32) -> str:
    """Greedy answer of the base model to one instruction, via its chat template."""
    import torch

    tok, model = base.tokenizer, base.model
    prompt = prompts.render(tok, record.text)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def pick_examples(tasks: dict[str, TaskData], n_tasks: int) -> list[Record]:
    """The first test record of the first `n_tasks` tasks: deterministic, varied."""
    return [d.test[0] for d in list(tasks.values())[:n_tasks] if d.test]


def run(out: Path, quick: bool = False, console: Console | None = None) -> dict:
    """Run the demo; return (and write to out/demo.json) what it showed."""
    console = console or Console()
    tasks = load_demo()
    console.print(data_table(tasks))
    t0 = time.perf_counter()
    base = load_base(DEFAULT_MODEL)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in base.model.parameters())
    console.print(f"base model {DEFAULT_MODEL}: {n_params / 1e6:.1f}M parameters, "
                  f"loaded in {load_s:.1f} s from {base.path}")
    answers = []
    for record in pick_examples(tasks, 3 if quick else len(tasks)):
        text = answer(base, record)
        answers.append({"task": record.task, "instruction": record.text,
                        "reference": record.output, "base_answer": text})
        console.print(f"\n[bold]{record.task}[/bold]  {record.text!r}\n"
                      f"  reference:   {record.output}\n  base model:  {text}")
    result = {
        "model": DEFAULT_MODEL,
        "parameters": n_params,
        "load_seconds": round(load_s, 3),
        "tasks": {t: {"train": len(d.train), "test": len(d.test)} for t, d in tasks.items()},
        "zero_shot_answers": answers,
    }
    atomic.write_json(out / "demo.json", result)
    console.print(f"\nwrote {out / 'demo.json'}")
    return result
