"""The demo's growth step: the library is trained on nine tasks first, then the tenth is added.

Why: the second half of the paper's case for a chain is what one adapter cannot do — a new
task type is one more small adapter, and nothing trained before changes. The demo shows it on
the user's own screen: the nine adapters and the trunk are checked byte for byte (sha256)
before and after, and the mixed adapter's cost to learn the same task (it must relearn all
ten) is measured in the same run, since Table I needs that adapter anyway.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from chainlora.eval.evaluate import examples_per_step
from chainlora.library.store import Library, adapter_sha256, read_manifest
from chainlora.train import config
from chainlora.train.recipe import train_library

GROWN = "rhyme"  # the task the demo adds last (bench/growth.py adds the same one)


def first_stage(cfg: config.Config, tasks: list[str]) -> config.Config:
    """The demo config without the task it adds later and without the mixed baseline, which is
    trained once, on all ten tasks, for Table I."""
    data = cfg.to_dict()
    data["tasks"] = [t for t in tasks if t != GROWN]
    data["mixed"] = {**data.get("mixed", {}), "enabled": False}
    return config.from_dict(data, "the demo's first stage")


def _complete(root: Path) -> Library | None:
    """The finished library at `root`, or None (none yet, or its first training was cut off)."""
    manifest = read_manifest(root) if root.is_dir() else None
    return Library.open(root, verify=False) if manifest and manifest.get("complete") else None


def _hashes(lib: Library) -> dict[str, str]:
    """sha256 of each trained adapter's files on disk: the trunk and every task adapter."""
    entries = ([lib.trunk] if lib.trunk else []) + lib.tasks
    return {e["name"]: adapter_sha256(lib.path(e)) for e in entries}


def summary(before: dict[str, str], lib: Library, seconds: float) -> dict:
    """What adding GROWN cost, read from the grown library's manifest and the files on disk."""
    after = _hashes(lib)
    new = lib.task(GROWN)
    per_step = examples_per_step(lib)
    selectors = {kind: entry.get("seconds", 0.0) for kind, entry in lib.selector_entries()}
    if lib.router:  # the paper's task-selection LoRA relearns the task list too
        selectors["router"] = lib.router.get("seconds", 0.0)
    trunk, mixed = lib.trunk or {}, lib.mixed or {}
    mixed_steps = mixed.get("steps", 0) + (trunk.get("steps", 0) if mixed.get("branch") else 0)
    mixed_s = mixed.get("seconds", 0.0) + (trunk.get("seconds", 0.0) if mixed.get("branch") else 0.0)
    return {"task": GROWN, "seconds": round(seconds, 1), "tasks_before": len(lib.tasks) - 1,
            "kept": sum(after.get(name) == sha for name, sha in before.items()), "of": len(before),
            "new_steps": new.get("steps", 0), "new_examples": new.get("steps", 0) * per_step,
            "new_seconds": new.get("seconds", 0.0),
            "selectors": sorted(selectors), "selector_seconds": round(sum(selectors.values()), 1),
            "mixed_steps": mixed_steps, "mixed_examples": mixed_steps * per_step, "mixed_seconds": round(mixed_s, 1)}


def line(g: dict) -> str:
    """The growth result in two sentences."""
    n = g["tasks_before"]
    return (f"growth: `{g['task']}` added to the {n}-task library in {g['seconds']:.0f} s — {g['kept']} of "
            f"{g['of']} trained adapters kept byte-identical (sha256, trunk included), 1 trained ({g['new_steps']} "
            f"steps, {g['new_examples']} examples, {g['new_seconds']:.1f} s), selectors retrained "
            f"({', '.join(g['selectors']) or 'none'}: {g['selector_seconds']:.1f} s).\n"
            f"One mixed adapter cannot add a task without relearning the others: on all {n + 1} from its start "
            f"it takes {g['mixed_steps']} steps, {g['mixed_examples']} examples, {g['mixed_seconds']:.1f} s "
            f"(trained in the same run for Table I, so the {g['seconds']:.0f} s above include it).")


def train(cfg: config.Config, root: Path, tasks: list[str], console: Console) -> dict | None:
    """Bring the demo library at `root` up to date in two stages; return the growth summary, or
    None when this run added nothing (the library already held GROWN: a second run)."""
    lib = _complete(root)
    if lib is None:  # first run (or its first stage was cut off: resumed)
        console.print(f"[bold]stage 1[/bold]: the chain on the {len(tasks) - 1} tasks other than {GROWN}")
        train_library(first_stage(cfg, tasks), root, resume=True)
        lib = _complete(root)
    if lib is None or GROWN in lib.task_names:  # already grown: keep what matches the config
        train_library(cfg, root, resume=True)
        return None
    before = _hashes(lib)
    console.print(f"[bold]stage 2[/bold]: add {GROWN} (and the mixed baseline on all {len(tasks)}, for Table I)")
    t0 = time.perf_counter()
    train_library(cfg, root, resume=True)
    g = summary(before, Library.open(root, verify=False), time.perf_counter() - t0)
    console.print(line(g))
    return g
