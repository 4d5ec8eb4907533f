"""What the Trainer is told for one adapter: device, precision, schedule, checkpoints and, with
`training.early_stopping`, evaluation on the validation records and keeping the best checkpoint.
Shared by the LoRA jobs (train/lora_job.py) and the selectors trained by a Trainer (train/selector_models.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from chainlora.errors import ChainloraError
from chainlora.train.config import TrainingSettings
from chainlora.train.plan import Job


def use_cpu() -> bool:
    """Train on the CPU when there is no accelerator; multi-process CPU runs then use gloo.

    The Trainer and our PartialState must agree: accelerate only treats torchrun's
    WORLD_SIZE > 1 as a CPU process group when asked for the CPU explicitly.
    """
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps and mps.is_available())


def resolved_precision(settings: TrainingSettings) -> str:
    """fp32, bf16 or fp16: what `precision: auto` means on this machine (bf16 where the GPU has it)."""
    import torch

    if settings.precision != "auto":
        return settings.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _precision(settings: TrainingSettings) -> dict[str, bool]:
    """Mixed precision: autocast to bf16 / fp16, the LoRA weights and optimizer state stay float32
    (so the adapters saved are float32 whatever the precision). bf16 runs on CPU too."""
    import torch

    p = resolved_precision(settings)
    if p == "fp16" and not torch.cuda.is_available():
        raise ChainloraError("training.precision: fp16 needs a CUDA GPU (use fp32 or bf16 on CPU)")
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def _checkpointing(settings: TrainingSettings) -> dict[str, Any]:
    """`training.gradient_checkpointing`: the Trainer enables it on the model (non-reentrant, so a
    frozen base with LoRA needs no input-grad hook; COLA's rebuilt LoRA modules are fine). Named
    activation_checkpointing since transformers 5.x; gradient_checkpointing before."""
    from transformers import TrainingArguments

    if not settings.gradient_checkpointing:
        return {}
    name = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{name}_checkpointing": True, f"{name}_checkpointing_kwargs": {"use_reentrant": False}}


def end_checkpointing(model: Any) -> None:
    """Switch gradient checkpointing (and the input-grad hook the Trainer adds with it) off again on
    the shared base model, so the next job and inference see the model as loaded."""
    new = hasattr(model, "activation_checkpointing_disable")  # transformers 5.x; the old names warn there
    if getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False):
        model.activation_checkpointing_disable() if new else model.gradient_checkpointing_disable()
    if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()


def warmup_steps(settings: TrainingSettings, steps: int) -> int:
    """Linear warm-up steps for `warmup_ratio` of the run. Computed here, as a whole number:
    transformers reads a warmup_steps below 1 as a ratio and 1.0 as ONE step, and 4.x ignores
    warmup_ratio once warmup_steps is set."""
    return math.ceil(round(settings.warmup_ratio * steps, 9))  # 0.07 * 100 is 7.000000000000001


def training_args(job: Job, work: Path, logs: Path):
    """TrainingArguments for one job; everything from the config, nothing hidden."""
    import importlib.util

    from transformers import TrainingArguments

    s = job.settings
    early = s.early_stopping.enabled and bool(job.validation)
    every = max(1, min(s.early_stopping.eval_steps, job.steps))  # a job shorter than eval_steps is still evaluated
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(logs)  # transformers reads it per run
    return TrainingArguments(
        output_dir=str(work),
        max_steps=job.steps,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.eval_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=warmup_steps(s, job.steps),
        weight_decay=s.weight_decay,
        seed=s.seed,
        data_seed=s.seed,
        save_strategy="steps",
        save_steps=s.save_steps if not early else every,  # the best must be a checkpoint
        **({"eval_strategy": "steps", "eval_steps": every, "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss", "greater_is_better": False} if early else {}),
        save_total_limit=2,
        logging_steps=s.logging_steps,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else "none",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        prediction_loss_only=True,
        use_cpu=use_cpu(),  # evaluation needs the loss, not 49k-wide logits kept in RAM
        **_precision(s),
        **_checkpointing(s),
    )


def early_stopping(job: Job) -> list | None:
    """The callbacks of `training.early_stopping` (None: off, or the job has no validation
    records); evaluating and keeping the best checkpoint are the Trainer's own (training_args)."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    e = job.settings.early_stopping
    if not (e.enabled and job.validation):
        return None

    class _LastStepToo(TrainerCallback):
        """The last step is a candidate as well: with steps not a multiple of eval_steps the
        Trainer would otherwise pick among earlier checkpoints only."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = control.should_save = True

    return [_LastStepToo()] + ([EarlyStoppingCallback(early_stopping_patience=e.patience)] if e.patience else [])


def stopping_facts(state: Any, job: Job) -> dict:
    """What the manifest records of an early-stopped job: the step of the checkpoint the Trainer
    kept as best (`checkpoint-N`), its validation loss, and the whole validation curve."""
    tail = (state.best_model_checkpoint or "").rsplit("-", 1)[-1]
    return {"best_step": int(tail) if tail.isdigit() else state.global_step, "n_validation": len(job.validation),
            "best_validation_loss": None if state.best_metric is None else round(state.best_metric, 5),
            "planned_steps": job.steps,
            "validation_curve": [[h["step"], round(h["eval_loss"], 5)] for h in state.log_history if "eval_loss" in h]}
