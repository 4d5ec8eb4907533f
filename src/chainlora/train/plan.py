"""Planning a training run: which adapters, on which examples, for how many steps.

A plan is a list of Jobs — one LoRA per task (M_t), the task-selection LoRA (P), the classifier
selector and the mixed-task baseline (M_mix); with `chain.branch` warm or residual, first a
shared trunk that the task adapters and the mixed baseline continue; or, for `chainlora
finetune`, one adapter on all tasks together. Everything a config can get wrong about them (unknown tasks, reserved names,
labels, COLA knots against step counts) fails here, before any model is loaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from chainlora.data import selector_instructions
from chainlora.data.examples import answer_pairs
from chainlora.data.records import Record, TaskData, check_min_records, demo_path, load_tasks, read_records, split_of
from chainlora.errors import ChainloraError
from chainlora.library import kinds, store
from chainlora.train import cola
from chainlora.train.config import Config
from chainlora.train.jobs import (Job, PlanContext, SelectorSplit, labels_for, sample,  # noqa: F401  (the API)
                                  steps_for)

FINETUNE = "finetune"  # the adapter's name in a `chainlora finetune` library
TRUNK = "trunk"  # the shared trunk's name and path in a library


def reserved() -> tuple[str, ...]:
    """Names a task cannot take: every entry kind's (the registry's) and the served names of their own."""
    return ("chain", "base", "selection", *kinds.single_entries())  # trunk, router, mixed, every selector


def load_data(cfg: Config) -> dict[str, TaskData]:
    """The config's data, split by task ("demo" means the bundled data and its fixed split)."""
    return load_with_discovery(cfg)[0]


def load_with_discovery(cfg: Config) -> tuple[dict[str, TaskData], dict | None]:
    """The config's data split by task, and with `tasks: auto` the discovery's summary (for the
    manifest): the tasks then come from clustering the train and test records together
    (chainlora.discover), their own task fields ignored."""
    d = cfg.data
    train, test = (demo_path("train"), demo_path("test")) if d.train == "demo" else (d.train, d.test)
    if cfg.tasks != "auto":
        return load_tasks(train, test_source=test, test_fraction=d.test_fraction, seed=cfg.training.seed,
                          min_records=d.min_records, fields=d.fields or None, task=d.task), None
    from chainlora.discover import discover
    from chainlora.discover.pipeline import UNLABELLED

    read = dict(fields=d.fields or None, task=UNLABELLED)
    train_records = list(read_records(train, **read))
    test_records = list(read_records(test, **read)) if test is not None else []
    found = discover(train_records + test_records, k=cfg.discover.k, min_size=cfg.discover.min_size,
                     seed=cfg.training.seed, source=f"{cfg.source}: tasks: auto: {train}")
    tasks: dict[str, TaskData] = {}
    for i, r in enumerate(found.records):
        part = ("train" if i < len(train_records) else "test") if test is not None else \
            split_of(r, cfg.training.seed, d.test_fraction)
        getattr(tasks.setdefault(r.task, TaskData()), part).append(r)
    check_min_records({t: len(x.train) + len(x.test) for t, x in tasks.items()}, d.min_records, train)
    return dict(sorted(tasks.items())), found.summary


def _template(r: Record) -> Any:
    return r.meta.get("template")


def selector_split(cfg: Config, train: dict[str, list[Record]]) -> SelectorSplit:
    """Hold out, per task, `selection.heldout_templates` templates (where at least two others
    stay) and `validation_per_task` records of them and of the seen templates (at most a
    quarter of the seen ones). Seeded: the same config and data give the same split."""
    s, seed = cfg.selection, cfg.training.seed
    extra = (selector_instructions.expand(selector_instructions.read(s.instructions), train,
                                          s.instructions_per_template, seed) if s.instructions else {})
    if not s.enabled:
        return SelectorSplit(dict(train), [], {t: set() for t in train}, extra)
    pool, validation, heldout = {}, [], {}
    for t, records in train.items():
        templates = sorted({_template(r) for r in records if _template(r) is not None}, key=str)
        k = s.heldout_templates if len(templates) >= s.heldout_templates + 2 else 0
        held = set(random.Random(f"{seed}:{t}").sample(templates, k)) if k else set()
        unseen = [r for r in records if _template(r) in held]
        seen = [r for r in records if _template(r) not in held]
        val_seen = sample(seen, min(s.validation_per_task, len(seen) // 4), seed)
        picked = {id(r) for r in val_seen}
        pool[t] = [r for r in seen if id(r) not in picked]
        validation += sample(unseen, s.validation_per_task, seed) + val_seen
        heldout[t] = held
    return SelectorSplit(pool, validation, heldout, extra)


def _check_default_selector(cfg: Config) -> None:
    """`selection.default` must name a selector this config trains (fails before any training)."""
    d = cfg.selection.default
    section = kinds.SELECTORS[d].section if d != "auto" else None
    if section and not getattr(cfg, section).enabled:
        raise ChainloraError(f"{cfg.source}: selection.default: {d!r} is not trained ({section}.enabled is false)")


def task_splits(cfg: Config, data: dict[str, TaskData]) -> tuple[list[str], dict, dict]:
    """The tasks to train and their (sampled) train and test records, checked."""
    names, parts = _task_parts(cfg, data)
    test = {t: sample(data[t].test, cfg.data.max_test_per_task, cfg.training.seed) for t in names}
    return names, {t: p[0] for t, p in parts.items()}, test


def _task_parts(cfg: Config, data: dict[str, TaskData]) -> tuple[list[str], dict[str, tuple[list, list, list]]]:
    """The tasks to train (checked) and, per task, its sampled train records split three ways:
    (what the adapters and selectors train on, the gate's hold-out, early stopping's validation)."""
    names = list(data) if cfg.tasks in ("all", "auto") else cfg.tasks
    for name in names:
        if name not in data:
            raise ChainloraError(f"{cfg.source}: tasks: unknown task {name!r} (data has: {', '.join(data)})")
        if name in reserved():
            raise ChainloraError(f"{cfg.source}: tasks: {name!r} is a reserved name; rename that task")
    _check_train_split(cfg, data, names)
    parts = {}
    for t in names:
        kept, gate = _gate_split(cfg, t, sample(data[t].train, cfg.data.max_train_per_task, cfg.training.seed))
        train, validation = _early_split(cfg, t, kept)
        parts[t] = (train, gate, validation)
    return names, parts


def _hold_out(records: list[Record], n: int, key: str) -> tuple[list[Record], list[Record]]:
    """(kept, held out): `n` records (at most a quarter) that no adapter or selector trains on,
    sampled with a seed of their own per task (`key`): adding a task moves no other task's."""
    n = min(n, len(records) // 4)
    held = random.Random(key).sample(records, n) if n else []
    picked = {id(r) for r in held}
    return [r for r in records if id(r) not in picked], held


def _early_split(cfg: Config, task: str, records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(kept, validation) for `training.early_stopping`: `validation_per_task` records a task."""
    e = cfg.training.early_stopping
    return _hold_out(records, e.validation_per_task, f"{cfg.training.seed}:early:{task}") if e.enabled else (records, [])


def validation_records(cfg: Config, data: dict[str, TaskData]) -> dict[str, list[Record]]:
    """Per task, the records `training.early_stopping` held out to choose each adapter's checkpoint."""
    return {t: p[2] for t, p in _task_parts(cfg, data)[1].items()}


def _gate_split(cfg: Config, task: str, records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(kept, held out) for `chain.gate`: `gate_per_task` records a task."""
    c = cfg.chain
    return _hold_out(records, c.gate_per_task, f"{cfg.training.seed}:gate:{task}") if c.gate else (records, [])


def gate_records(cfg: Config, data: dict[str, TaskData]) -> dict[str, list[Record]]:
    """Per task, the records `chain.gate` held out of training (empty where the gate is off)."""
    return {t: p[1] for t, p in _task_parts(cfg, data)[1].items()}


def _plan_links(cfg: Config, job: Job) -> None:
    """Knots and ranks of a `method: cola` job, checked against its step count before any model
    is loaded (a bad knot fails in a second, not after the first adapters have trained)."""
    if job.settings.method != "cola" or not kinds.ENTRIES[job.kind].lora:  # no LoRA there
        return
    section = job.section if job.section != "training" and "cola" in getattr(
        cfg, job.section.split(".")[0]).training else "training"
    job.link_plan = cola.link_plan(job.settings.cola, job.steps, cfg.lora.r, f"{cfg.source}: {section}.cola")


def _check_train_split(cfg: Config, data: dict[str, TaskData], names: list[str]) -> None:
    """Every task needs training records: the Trainer would fail on an empty one only after the
    adapters before it had trained."""
    for t in names:
        if not data[t].train:
            where = "the test file" if cfg.data.test else "the test split"
            raise ChainloraError(
                f"{cfg.source}: task {t!r}: no training records (0 train, {len(data[t].test)} in {where}); "
                "add training records, lower data.test_fraction, or leave it out of tasks")


def trunk_steps(cfg: Config, branch_steps: int) -> int:
    """The trunk's optimizer steps: chain.trunk_steps, else trunk_fraction of trunk + branches."""
    c = cfg.chain
    if c.trunk_steps is not None:
        return c.trunk_steps
    return max(1, round(c.trunk_fraction / (1.0 - c.trunk_fraction) * branch_steps))


def _branch(cfg: Config, job: Job, mode: str, trunk: Job) -> None:
    """Make `job` continue the trunk: no second warm-up, the schedule decays from the trunk's
    stable learning rate over the job's own steps."""
    job.start, job.branch = trunk.path, mode
    job.settings = job.settings.model_copy(update={"warmup_ratio": 0.0})
    job.info["branch"] = {"mode": mode, "from": trunk.path, "trunk_steps": trunk.steps,
                          "total_steps": trunk.steps + job.steps}


def _plan_trunk(cfg: Config, tasks: list[Job], train: dict[str, list[Record]], test: dict[str, list[Record]],
                on: list[str]) -> Job:
    """The shared trunk: all (or the `on`) tasks' data, a constant learning rate after warm-up.
    Its steps follow the branches of the tasks it is trained on: a task added to a library keeps
    the trunk its earlier tasks were trained with (same steps, same examples, same fingerprint)."""
    steps = trunk_steps(cfg, sum(j.steps for j in tasks if j.name in on))
    settings = cfg.training.model_copy(update={"lr_scheduler": "constant_with_warmup"})
    trunk = Job("trunk", TRUNK, TRUNK, answer_pairs([r for t in on for r in train[t]]),
                answer_pairs([r for t in on for r in test[t]]), settings, steps=steps,
                info={"name": TRUNK, "tasks": on, "branch_mode": cfg.chain.branch})
    for job in tasks:
        _branch(cfg, job, cfg.chain.branch, trunk)
    return trunk


def _replay(cfg: Config, tasks: list[Job], train: dict[str, list[Record]]) -> None:
    """Add `chain.replay` of other tasks' records to each branch's examples (its steps stay)."""
    share, seed = cfg.chain.replay, cfg.training.seed
    for job in tasks:
        others = [r for t, records in train.items() if t != job.name for r in records]
        n = round(len(job.train) * share / (1.0 - share))
        job.train = job.train + answer_pairs(sample(others, n, seed))
        job.info["branch"]["replay"] = share


@dataclass
class Plan:
    """A run's jobs and the data splits behind them, computed once."""

    jobs: list[Job]
    names: list[str]  # the trained tasks
    train: dict[str, list[Record]]  # per task: what the adapters train on
    test: dict[str, list[Record]]
    split: SelectorSplit | None  # the selectors' split (None: `chainlora finetune`)
    gate: dict[str, list[Record]]  # per task: `chain.gate`'s held-out records (empty lists: off)
    validation: dict[str, list[Record]]  # per task: early stopping's held-out records

    def of_kind(self, *kinds_: str) -> list[Job]:
        return [j for j in self.jobs if j.kind in kinds_]


def plan_train(cfg: Config, data: dict[str, TaskData], world_size: int = 1,
               trunk_tasks: list[str] | None = None) -> Plan:
    """`chainlora train`: the trunk (chain.branch warm / residual), task adapters in task order,
    then the selectors (in chainlora.library.kinds' order), the mixed baseline. `trunk_tasks`:
    train the trunk on these tasks only (an existing trunk the new tasks branch from; default: all)."""
    names, parts = _task_parts(cfg, data)
    train = {t: p[0] for t, p in parts.items()}
    test = {t: sample(data[t].test, cfg.data.max_test_per_task, cfg.training.seed) for t in names}
    _check_default_selector(cfg)
    jobs = [_task_job(cfg, t, train[t], test[t], world_size) for t in names]
    task_steps = [j.steps for j in jobs]
    trunk = None
    if cfg.chain.branch != "none":
        trunk = _plan_trunk(cfg, jobs, train, test, [t for t in names if t in (trunk_tasks or ())] or names)
        if cfg.chain.replay:
            _replay(cfg, jobs, train)
    ctx = PlanContext(cfg, names, test, selector_split(cfg, train), world_size)  # selectors never see validation
    if cfg.router.enabled:
        for job in jobs:
            job.info["label"] = ctx.labels[job.name]
    jobs = ([trunk] if trunk else []) + jobs + _selector_jobs(ctx)
    if cfg.mixed.enabled:
        jobs.append(_plan_mixed(cfg, names, train, test, task_steps, trunk))
    plan = Plan(jobs, names, train, test, ctx.split, {t: p[1] for t, p in parts.items()},
                {t: p[2] for t, p in parts.items()})
    _attach_validation(cfg, plan)
    for job in jobs:
        _plan_links(cfg, job)
    return plan


def _task_job(cfg: Config, task: str, train: list[Record], test: list[Record], world_size: int) -> Job:
    """M_t: one LoRA on its own task's records."""
    job = Job("task", task, store.task_path(task), answer_pairs(train), answer_pairs(test), cfg.training,
              info={"name": task, "label": task})
    job.steps = steps_for(job.settings, len(job.train), world_size)
    return job


def _selector_jobs(ctx: PlanContext) -> list[Job]:
    """Every registered selector model the config enables, built by its kind's `plan` function."""
    jobs = []
    for kind in kinds.ENTRIES.values():
        if kind.plan:
            job = kinds.resolve(kind.plan)(ctx.cfg, ctx)
            if job is not None:
                jobs.append(job)
    return jobs


def _plan_mixed(cfg: Config, names: list[str], train: dict[str, list[Record]], test: dict[str, list[Record]],
                task_steps: list[int], trunk: Job | None) -> Job:
    """M_mix on every task's records, with `mixed.budget` steps (after the trunk, when it continues one)."""
    mixed = Job("mixed", "mixed", "mixed", answer_pairs([r for t in names for r in train[t]]),
                answer_pairs([r for t in names for r in test[t]]), cfg.training_for("mixed"),
                section="mixed.training", info={"name": "mixed", "budget": cfg.mixed.budget})
    budget = cfg.mixed.budget
    mixed.steps = sum(task_steps) if budget == "matched" else max(task_steps) if budget == "same" else budget
    if trunk is not None:  # the trunk continued on all tasks: trunk + branches' steps in all
        if isinstance(budget, int):
            if budget <= trunk.steps:
                raise ChainloraError(f"{cfg.source}: mixed.budget: {budget} steps do not go past the "
                                     f"trunk's {trunk.steps} (the mixed adapter continues the trunk)")
            mixed.steps = budget - trunk.steps
        _branch(cfg, mixed, "warm", trunk)
    return mixed


def _attach_validation(cfg: Config, plan: Plan) -> None:
    """Early stopping: each task adapter is chosen on its task's validation records; the trunk and
    the mixed adapter on all of them (the same data the chain's adapters are chosen on)."""
    if not cfg.training.early_stopping.enabled:
        return
    held, names = plan.validation, plan.names
    for job in plan.jobs:
        if not job.settings.early_stopping.enabled:
            continue
        if job.kind == "task":
            job.validation = answer_pairs(held[job.name])
        elif job.kind in ("trunk", "mixed"):
            job.validation = answer_pairs([r for t in (job.info.get("tasks") or names) for r in held[t]])


def plan_finetune(cfg: Config, data: dict[str, TaskData], world_size: int = 1) -> Plan:
    """`chainlora finetune`: ONE adapter on every selected task's records together, named after
    `data.task` (else "finetune") — a plain single-adapter fine-tune, e.g. with method: cola."""
    names = list(data) if cfg.tasks in ("all", "auto") else cfg.tasks
    for name in names:
        if name not in data:
            raise ChainloraError(f"{cfg.source}: tasks: unknown task {name!r} (data has: {', '.join(data)})")
    _check_train_split(cfg, data, names)
    seed, d = cfg.training.seed, cfg.data
    # with early stopping, the same validation records `chainlora train` holds out of this config's tasks
    splits = {t: _early_split(cfg, t, sample(data[t].train, d.max_train_per_task, seed)) for t in names}
    tests = {t: sample(data[t].test, d.max_test_per_task, seed) for t in names}
    name = d.task or FINETUNE
    if name in reserved():
        raise ChainloraError(f"{cfg.source}: data.task: {name!r} is a reserved name")
    job = Job("task", name, store.task_path(name), answer_pairs([r for t in names for r in splits[t][0]]),
              answer_pairs([r for t in names for r in tests[t]]), cfg.training,
              info={"name": name, "label": name, "tasks": names})
    job.steps = steps_for(job.settings, len(job.train), world_size)
    if cfg.training.early_stopping.enabled:
        job.validation = answer_pairs([r for t in names for r in splits[t][1]])
    _plan_links(cfg, job)
    return Plan([job], names, {t: splits[t][0] for t in names}, tests, None, {t: [] for t in names},
                {t: splits[t][1] for t in names})
