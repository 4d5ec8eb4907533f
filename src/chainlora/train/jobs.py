"""What a training plan is made of, shared by the planner (plan.py) and the selectors' job
builders (plan_selectors.py) without either calling back into the other: the Job, the
selectors' data split, the run's context a builder reads, and the small rules both use
(seeded sampling, steps from epochs, the router's labels)."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from typing import Any

from chainlora.data.examples import Pair
from chainlora.data.records import Record
from chainlora.errors import ChainloraError
from chainlora.train.config import Config, TrainingSettings


@dataclass
class Job:
    """One adapter to train."""

    kind: str  # an entry kind of chainlora.library.kinds: task, trunk, router, classifier, ..., mixed
    name: str  # the task's name, or the kind
    path: str  # where it goes, relative to the library
    train: list[Pair]
    test: list[Pair]
    settings: TrainingSettings
    steps: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # extra manifest fields (label, ...)
    section: str = "training"  # the config section its settings come from (for messages)
    validation: list[Pair] = field(default_factory=list)  # early stopping: what picks the best checkpoint
    link_plan: Any = None  # cola.LinkPlan: knots and ranks, when trained as a residual chain (method: cola)
    start: str | None = None  # path of the adapter it continues (the trunk), None: from zero
    branch: str = "none"  # how it continues `start`: warm (its LoRA) or residual (merged, a fresh LoRA)
    reads_base: bool = True  # False: a selector over its own encoder (MiniLM); the base model does not decide it


def sample(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    """At most `limit` records, a seeded sample (data files are often sorted)."""
    if limit is None or len(records) <= limit:
        return list(records)
    return random.Random(seed).sample(records, limit)


@dataclass
class SelectorSplit:
    """What the selectors may train on, and the validation data none of them sees: records held
    out of the train split, and per task whole instruction templates (unseen wording)."""

    pool: dict[str, list[Record]]  # per task: the selectors' training records
    validation: list[Record]
    heldout: dict[str, set]  # per task: the templates held out (empty where records carry none)
    extra: dict[str, list[Record]] = field(default_factory=dict)  # per task: selection.instructions

    def training(self, task: str, limit: int | None, seed: int) -> list[Record]:
        """A selector's training records of `task`: up to `limit` of the pool, then every extra phrasing
        (the extras are on top, so they never push the task's own records out)."""
        return sample(self.pool[task], limit, seed) + self.extra.get(task, [])


def steps_for(settings: TrainingSettings, n_examples: int, world_size: int = 1) -> int:
    """Optimizer steps for a job: max_steps, else epochs over the data."""
    if settings.max_steps is not None:
        return settings.max_steps
    per_step = settings.batch_size * settings.gradient_accumulation_steps * world_size
    return max(1, math.ceil(math.ceil(n_examples / per_step) * settings.epochs))


def labels_for(cfg: Config, tasks: list[str]) -> dict[str, str]:
    """Router labels: the configured ones, else the task names; unique and non-empty."""
    for key in cfg.router.labels:
        if key not in tasks:
            raise ChainloraError(f"{cfg.source}: router.labels.{key}: not a trained task")
    labels = {t: cfg.router.labels.get(t, t).strip() for t in tasks}
    seen: dict[str, str] = {}
    for task, label in labels.items():
        if not label:
            raise ChainloraError(f"{cfg.source}: router.labels.{task}: empty label")
        if label in seen:
            raise ChainloraError(f"{cfg.source}: router.labels.{task}: label {label!r} also names {seen[label]!r}")
        seen[label] = task
    return labels


@dataclass
class PlanContext:
    """What every selector's job builder reads (chainlora.library.kinds `plan` functions)."""

    cfg: Config
    names: list[str]  # the tasks, in order
    test: dict[str, list[Record]]
    split: SelectorSplit  # the selectors' training pool and the validation none of them sees
    world_size: int = 1

    @functools.cached_property
    def labels(self) -> dict[str, str]:
        """The router's labels (checked on first use: only the selectors that name labels ask)."""
        return labels_for(self.cfg, self.names)

    def training(self, limit: int | None) -> list[Record]:
        """Every task's selector training records, at most `limit` a task (plus the extra phrasings)."""
        return [r for t in self.names for r in self.split.training(t, limit, self.cfg.training.seed)]

    def test_records(self) -> list[Record]:
        return [r for t in self.names for r in self.test[t]]
