"""The one registry of what a library holds and of the selectors that choose a task.

Two tables, read by every stage that needs a list of kinds (train's planner, runner, change
detection and progress bar; the store's file checks; the engine's routing; eval; the server;
the CLI's `--selector` choices; the config's `selection.default`):

- `ENTRIES`: each kind of trained thing a library directory holds (a job kind at train time,
  a manifest key afterwards): its files, whether it is a LoRA over the base, whether it trains
  with a Trainer, and — for the kinds that are not plain LoRA jobs — how it is planned and trained.
- `SELECTORS`: each way to rank the tasks for an instruction: the entry it runs on, the config
  section that trains that entry, how it ranks, and its place when a library has no measured winner.

Callables are named "module:function" and imported on first use by the stage that calls them
(train calls `plan` / `train`, inference calls `rank`), so this table imports nothing above the
library stage. Adding a selector is one `register_entry` + one `register_selector` and the
module holding its three functions (docs/routing.md, "Adding a selector";
tests/test_kinds.py registers a toy one).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a plain PEFT adapter


@dataclass(frozen=True)
class EntryKind:
    """A kind of trained thing in a library: job kind while training, manifest key after."""

    name: str
    files: tuple[str, ...] = ADAPTER_FILES
    lora: bool = True  # a PEFT LoRA over the base model (trained by the LoRA runner, COLA-capable)
    trainer: bool = True  # trains with transformers' Trainer: its steps weigh on the run's ETA
    selector: bool = False  # a selector's model: its fingerprint decides the `selection` block
    # trained by its own config section's keys: of `training` only the seed is in its fingerprint
    own_section: bool = False
    listed: bool = False  # the manifest holds a list of them (tasks), not one entry under its name
    # "module:function" (cfg, ctx) -> Job | None, building its job from the run's shared data
    # (chainlora.train.plan.PlanContext); "" for the kinds the planner builds itself
    plan: str = ""
    # "module:function" (job, base, cfg, root, progress) -> manifest entry; "": the LoRA runner
    train: str = ""


@dataclass(frozen=True)
class SelectorKind:
    """A way to rank a library's tasks for an instruction."""

    name: str
    entry: str  # the EntryKind whose files it runs on
    section: str  # the config section whose `enabled` trains that entry
    rank: str  # "module:function" (engine, texts) -> list[Ranking], called under the engine's lock
    preference: int | None = None  # default order where nothing was measured (lowest first; None: never)


ENTRIES: dict[str, EntryKind] = {}
SELECTORS: dict[str, SelectorKind] = {}


def register_entry(kind: EntryKind) -> EntryKind:
    """Add (or replace) an entry kind; returns it."""
    ENTRIES[kind.name] = kind
    return kind


def register_selector(kind: SelectorKind) -> SelectorKind:
    """Add (or replace) a selector; its entry must be registered first."""
    if kind.entry not in ENTRIES:
        raise ValueError(f"selector {kind.name!r}: no entry kind {kind.entry!r} (register_entry first)")
    SELECTORS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a selector and the entry of the same name (tests register toys and clean up)."""
    SELECTORS.pop(name, None)
    ENTRIES.pop(name, None)


def resolve(path: str) -> Callable[..., Any]:
    """"package.module:function" -> the function (imported now, by the stage that calls it)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def selector_names() -> tuple[str, ...]:
    """Every registered selector, in registration order (the CLI's and config's choices)."""
    return tuple(SELECTORS)


def files_of(kind: str) -> tuple[str, ...]:
    """The files an entry of `kind` consists of (a LoRA adapter's for unknown kinds)."""
    return ENTRIES[kind].files if kind in ENTRIES else ADAPTER_FILES


def single_entries() -> list[str]:
    """Manifest keys holding one entry each (every kind but the listed tasks), in table order."""
    return [k for k, e in ENTRIES.items() if not e.listed]


def model_selectors() -> list[str]:
    """Entry kinds that are a selector's model of its own, not a LoRA (classifier, encoder, sft...)."""
    return [k for k, e in ENTRIES.items() if e.selector and not e.lora]


def available(manifest: dict) -> list[str]:
    """The selectors a library can run: those whose entry it holds, in table order."""
    return [s.name for s in SELECTORS.values() if manifest.get(s.entry)]


def default_for(manifest: dict) -> str | None:
    """The selector a library routes with: its measured winner, else the most preferred it can
    run (classifier: 97.5% against score's 89.4% on the demo, bench/RESULTS.md), else `score`
    where it has the task-selection LoRA, else None."""
    winner = (manifest.get("selection") or {}).get("winner")
    if winner:
        return winner
    ranked = sorted((s.preference, s.name) for s in SELECTORS.values()
                    if s.preference is not None and manifest.get(s.entry))
    return ranked[0][1] if ranked else None


# --------------------------------------------------------------------------- the built-in kinds

_PLAN = "chainlora.train.plan_selectors"
_TRAIN = "chainlora.train.selector_models"
_RANK = "chainlora.inference.selectors"

# in planning and training order
register_entry(EntryKind("task", listed=True))
register_entry(EntryKind("trunk"))
register_entry(EntryKind("router", selector=True, plan=f"{_PLAN}:plan_router"))
register_entry(EntryKind("classifier", ("classifier.json", "head.safetensors"), lora=False, trainer=False,
                         selector=True, own_section=True, plan=f"{_PLAN}:plan_classifier",
                         train=f"{_TRAIN}:run_classifier_job"))
register_entry(EntryKind("sft", ("config.json", "model.safetensors"), lora=False, selector=True,
                         plan=f"{_PLAN}:plan_sft", train=f"{_TRAIN}:run_sft_job"))
register_entry(EntryKind("encoder", ("encoder.json", "model.safetensors"), lora=False, trainer=False,
                         selector=True, own_section=True, plan=f"{_PLAN}:plan_encoder",
                         train=f"{_TRAIN}:run_encoder_job"))
register_entry(EntryKind("mixed"))

register_selector(SelectorKind("score", "router", "router", f"{_RANK}:rank_score", preference=2))
register_selector(SelectorKind("generate", "router", "router", f"{_RANK}:rank_generate"))
register_selector(SelectorKind("classifier", "classifier", "classifier", f"{_RANK}:rank_classifier", preference=0))
register_selector(SelectorKind("encoder", "encoder", "encoder", f"{_RANK}:rank_encoder", preference=1))
register_selector(SelectorKind("sft", "sft", "sft", f"{_RANK}:rank_sft", preference=3))
