"""The jobs that train the task selectors, one builder a kind (named in chainlora.library.kinds).

Each reads the run's shared PlanContext: the selectors' training pool (never the validation
records that choose between them), the test records and the router's labels; each returns None
when its config section is off.
"""

from __future__ import annotations

from chainlora.data.examples import Pair, selector_pairs
from chainlora.train.config import Config, TrainingSettings
from chainlora.train.jobs import Job, PlanContext, steps_for


def _label_job(cfg: Config, ctx: PlanContext, kind: str, limit: int | None, info: dict) -> Job:
    """A job on task_prompt(x) -> label, with `kind`'s own training overrides (`<kind>.training`)."""
    template, labels = cfg.router.task_prompt, ctx.labels
    job = Job(kind, kind, kind, selector_pairs(ctx.training(limit), labels, template),
              selector_pairs(ctx.test_records(), labels, template), cfg.training_for(kind),
              section=f"{kind}.training", info={"name": kind, **info, "task_prompt": template, "labels": labels})
    job.steps = steps_for(job.settings, len(job.train), ctx.world_size)
    return job


def plan_router(cfg: Config, ctx: PlanContext) -> Job | None:
    """P, the task-selection LoRA: task_prompt(x) -> label (Qiu et al. 2024)."""
    if not cfg.router.enabled:
        return None
    return _label_job(cfg, ctx, "router", cfg.router.max_train_per_task, {"kind": "lora", "selector": "score"})


def plan_classifier(cfg: Config, ctx: PlanContext) -> Job | None:
    """A linear head over a frozen encoder: instruction -> task, `classifier.epochs` full-batch steps."""
    c = cfg.classifier
    if not c.enabled:
        return None
    return Job("classifier", "classifier", "classifier",
               [Pair(r.text, r.task) for r in ctx.training(c.max_train_per_task)],
               [Pair(r.text, r.task) for r in ctx.test_records()], cfg.training, steps=c.epochs,
               info={"name": "classifier", "encoder": c.encoder, "tasks": ctx.names}, reads_base=c.encoder == "base")


def plan_sft(cfg: Config, ctx: PlanContext) -> Job | None:
    """A fully fine-tuned copy of the base model on task_prompt(x) -> label (Table III's SFT)."""
    if not cfg.sft.enabled:
        return None
    return _label_job(cfg, ctx, "sft", cfg.sft.max_train_per_task, {"kind": "full"})


def plan_encoder(cfg: Config, ctx: PlanContext) -> Job | None:
    """all-MiniLM-L6-v2 fine-tuned end to end on instruction -> task (Table III's BERT-SFT)."""
    e = cfg.encoder
    if not e.enabled:
        return None
    train = ctx.training(e.max_train_per_task)
    steps = steps_for(TrainingSettings(max_steps=None, epochs=e.epochs, batch_size=e.batch_size), len(train),
                      ctx.world_size)
    return Job("encoder", "encoder", "encoder", [Pair(r.text, r.task) for r in train],
               [Pair(r.text, r.task) for r in ctx.test_records()], cfg.training, steps=steps,
               info={"name": "encoder", "encoder": "minilm", "tasks": ctx.names}, reads_base=False)
