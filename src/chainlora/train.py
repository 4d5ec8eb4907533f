"""`chainlora train`: the routed chain's adapters, trained one after another into a library.

A run is a plan of jobs (chainlora.plan) — one LoRA per task (M_t), the task-selection LoRA (P) and the
mixed-task baseline (M_mix) — executed by transformers' Trainer on ONE base model loaded once:
each job wraps the base with `get_peft_model`, trains, saves the adapter atomically into the
library, and `unload()`s the LoRA layers so the next job starts from the untouched base.
The Trainer brings gradient accumulation, bf16/fp16, checkpoints, logging and
accelerate/torchrun multi-process training; only the main process writes the library.

Resume: each job checkpoints into LIB/.work/<job>/; the manifest is rewritten after every
finished adapter. `--resume` skips finished adapters (hash-checked) and continues the job in
progress from its last complete Trainer checkpoint (RNG, optimizer, data order included).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from chainlora import cola, library
from chainlora.config import Config, TrainingSettings
from chainlora.errors import ChainloraError
from chainlora.examples import build_dataset, collator
from chainlora.plan import Job, load_data, plan, plan_finetune  # noqa: F401  (train.plan: the API)
from chainlora.progress import RunProgress

WORK = ".work"
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt")


# --------------------------------------------------------------------------- one job


def last_checkpoint(work: Path, files: tuple[str, ...] = CHECKPOINT_FILES) -> Path | None:
    """The newest COMPLETE Trainer checkpoint in `work`: `files` all there (trainer_state.json
    is the Trainer's last write; a COLA job's links follow it, so they are required too)."""
    import json

    found = []
    for ckpt in work.glob("checkpoint-*"):
        try:
            step = int(ckpt.name.split("-")[1])
            json.loads((ckpt / "trainer_state.json").read_text())
        except (ValueError, IndexError, OSError, json.JSONDecodeError):
            continue
        if all((ckpt / f).is_file() for f in files):
            found.append((step, ckpt))
    return max(found)[1] if found else None


def use_cpu() -> bool:
    """Train on the CPU when there is no accelerator; multi-process CPU runs then use gloo.

    The Trainer and our PartialState must agree: accelerate only treats torchrun's
    WORLD_SIZE > 1 as a CPU process group when asked for the CPU explicitly.
    """
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps and mps.is_available())


def _precision(settings: TrainingSettings) -> dict[str, bool]:
    import torch

    p = settings.precision
    if p == "auto":
        p = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16" and not torch.cuda.is_available():
        raise ChainloraError("training.precision: fp16 needs a CUDA GPU (use fp32 or bf16 on CPU)")
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def training_args(job: Job, work: Path, logs: Path):
    """TrainingArguments for one job; everything from the config, nothing hidden."""
    import importlib.util

    from transformers import TrainingArguments

    s = job.settings
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(logs)  # transformers reads it per run
    return TrainingArguments(
        output_dir=str(work),
        max_steps=job.steps,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.eval_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio,
        weight_decay=s.weight_decay,
        seed=s.seed,
        data_seed=s.seed,
        save_strategy="steps",
        save_steps=s.save_steps,
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
    )


def run_job(job: Job, base: Any, cfg: Config, root: Path, resume: bool, progress: RunProgress) -> dict:
    """Train one adapter on `base`, save it into the library, restore the base; return its entry."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, set_seed
    from transformers.trainer_callback import ProgressCallback

    work, tok = root / WORK / job.path.replace("/", "-"), base.tokenizer
    files = CHECKPOINT_FILES + ((cola.STATE_FILE,) if job.chain else ())
    checkpoint = last_checkpoint(work, files) if resume else None
    if checkpoint is None and work.exists():
        shutil.rmtree(work)  # stale partial work of an earlier, abandoned attempt
    set_seed(job.settings.seed)  # same LoRA init whether or not earlier jobs ran in this process
    c = job.settings.cola
    lora = LoraConfig(r=job.chain.ranks[0] if job.chain else cfg.lora.r, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
                      init_lora_weights=True if not job.chain or c.init == "kaiming" else "gaussian",
                      task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base.model, lora)
    except ValueError as e:
        raise ChainloraError(f"{cfg.source}: lora.target_modules: {e}".splitlines()[0])
    chain = cola.ColaCallback(model, job.chain, c, cfg.lora.alpha) if job.chain else None
    tok.padding_side = "right"
    system = cfg.system_prompt
    train_ds = build_dataset(tok, job.train, job.settings.max_length, system)
    test_ds = build_dataset(tok, job.test, job.settings.max_length, system) if job.test else None
    trainer = Trainer(model=model, args=training_args(job, work, root / "logs" / job.name),
                      train_dataset=train_ds, data_collator=collator(tok),
                      callbacks=[progress.callback(job)] + ([chain] if chain else []))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress.step_bar())
    t0 = time.perf_counter()
    try:
        if chain and checkpoint:
            chain.load(checkpoint)
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException:
        if chain:
            chain.restore_base()  # the next job in this process must see W0, not merged links
        raise
    seconds = time.perf_counter() - t0
    entry = {**job.info, "path": job.path, "n_train": len(job.train), "n_test": len(job.test),
             "steps": job.steps, "tokens": int(trainer.state.num_input_tokens_seen),
             "train_loss": round(result.training_loss, 5), "seconds": round(seconds, 1),
             "loss_curve": [[h["step"], round(h["loss"], 5)] for h in trainer.state.log_history
                            if "loss" in h]}
    if chain:  # from here on the model is W0 + one plain LoRA equal to the whole chain
        entry["cola"] = chain.export(c.compress_rank, f"{cfg.source}: {job.section}.cola.compress_rank")
    if test_ds is not None:
        entry["test_loss"] = round(trainer.evaluate(test_ds)["eval_loss"], 5)
        if job.kind == "task":
            with model.disable_adapter():
                entry["base_test_loss"] = round(trainer.evaluate(test_ds)["eval_loss"], 5)
    if trainer.is_world_process_zero():
        entry["sha256"] = library.save_adapter(model, root, job.path)
    trainer.accelerator.wait_for_everyone()
    base.model = model.unload()  # the LoRA layers go; base weights were never touched
    return entry


def run_classifier_job(job: Job, base: Any, cfg: Config, root: Path) -> dict:
    """Embed the instructions with the frozen encoder and fit the linear head (no Trainer:
    a full-batch probe on fixed features is a few hundred tiny steps)."""
    import torch

    from chainlora import atomic, classifier

    t0 = time.perf_counter()
    tasks = job.info["tasks"]
    encoder = classifier.Encoder(cfg.classifier.encoder, base.model, base.tokenizer)
    x = encoder.embed([p.text for p in job.train])
    y = torch.tensor([tasks.index(p.answer) for p in job.train])
    head, loss = classifier.train_head(x, y, len(tasks), epochs=job.steps,
                                       lr=cfg.classifier.learning_rate, seed=cfg.training.seed)
    entry = {**job.info, "path": job.path, "n_train": len(job.train), "n_test": len(job.test),
             "steps": job.steps, "tokens": 0, "train_loss": round(loss, 5)}
    with torch.no_grad():
        entry["train_accuracy"] = round(float((head(x).argmax(-1) == y).float().mean()), 4)
        if job.test:
            xt = encoder.embed([p.text for p in job.test])
            yt = torch.tensor([tasks.index(p.answer) for p in job.test])
            entry["test_accuracy"] = round(float((head(xt).argmax(-1) == yt).float().mean()), 4)
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    from accelerate import PartialState

    if PartialState().is_main_process:
        with atomic.directory(library.inside(root, job.path), replace=True) as tmp:
            classifier.save(tmp, head, {"encoder": cfg.classifier.encoder, "tasks": tasks})
            entry["sha256"] = library.adapter_sha256(tmp, classifier.FILES)
    return entry


# --------------------------------------------------------------------------- the run


def _prepare_root(cfg: Config, root: Path, resume: bool, force: bool, digest: str) -> dict | None:
    """Decide what to do with an existing output directory; return a manifest to continue."""
    manifest = library.read_manifest(root)
    if manifest is None:
        if root.exists() and any(p.name != WORK for p in root.iterdir()) and not force:
            raise ChainloraError(f"{root}: exists and is not a chainlora library; choose another --out")
        if force and root.exists():
            shutil.rmtree(root)
        return None
    if force:
        shutil.rmtree(root)
        return None
    if manifest.get("config_sha256") != digest:
        raise ChainloraError(f"{root}: holds a library trained with a different config; "
                             "use --force to overwrite it or another --out")
    if resume:
        return manifest
    raise ChainloraError(f"{root}: an unfinished run is here; --resume to continue it, --force to start over")


def _finished(root: Path, manifest: dict, job: Job) -> dict | None:
    """The manifest entry of `job` when its adapter is on disk with the recorded hash."""
    from chainlora.classifier import FILES as CLASSIFIER_FILES

    entries = manifest["tasks"] if job.kind == "task" else [manifest.get(job.kind)]
    files = CLASSIFIER_FILES if job.kind == "classifier" else library.ADAPTER_FILES
    for entry in entries:
        if entry and entry.get("path") == job.path:
            try:
                if library.adapter_sha256(library.inside(root, job.path), files) == entry.get("sha256"):
                    return entry
            except ChainloraError:
                return None
    return None


def _record(manifest: dict, job: Job, entry: dict) -> None:
    if job.kind == "task":
        manifest["tasks"] = [e for e in manifest["tasks"] if e["path"] != job.path] + [entry]
    else:
        manifest[job.kind] = entry


def train_library(cfg: Config, out: str | Path | None = None, *, resume: bool = False,
                  force: bool = False, finetune: bool = False) -> Path:
    """Train every adapter the config asks for into the library at `out`; return its path.
    finetune=True trains ONE adapter on all selected tasks (no router, classifier or mixed)."""
    from accelerate import PartialState

    from chainlora.models import load_base

    state = PartialState(cpu=use_cpu())  # torch.distributed under accelerate launch / torchrun
    root = Path(out or cfg.output_dir)
    digest = cfg.digest() if not finetune else library.files_sha256([("finetune", cfg.digest().encode())])
    data = load_data(cfg)  # check data before loading a model: bad input fails fast
    jobs = plan_finetune(cfg, data, state.num_processes) if finetune else plan(cfg, data, state.num_processes)
    existing = library.read_manifest(root)
    if existing and existing.get("complete") and existing.get("config_sha256") == digest and not force:
        if state.is_main_process:
            print(f"{root}: already trained with this config (use --force to retrain)")
        return root
    base = load_base(cfg.base_model, dtype=cfg.dtype)
    if state.is_main_process:
        manifest = _prepare_root(cfg, root, resume, force, digest)
        if manifest is None:
            manifest = library.new_manifest(cfg.base_model, base.fingerprint, cfg.to_dict(), digest,
                                            cfg.system_prompt)
        elif manifest["base_model"]["fingerprint"] != base.fingerprint:
            raise ChainloraError(f"{root / library.MANIFEST}: trained on another base model than "
                                 f"{cfg.base_model!r}; use --force to retrain")
        root.mkdir(parents=True, exist_ok=True)
        library.write_manifest(root, manifest)
    state.wait_for_everyone()
    manifest = library.read_manifest(root)  # every process sees what the main one decided
    progress = RunProgress(jobs, enabled=state.is_main_process)
    for job in jobs:
        done = _finished(root, manifest, job)
        if done is not None:
            progress.skip(job, done)
            continue
        if job.kind == "classifier":
            entry = run_classifier_job(job, base, cfg, root)
        else:
            entry = run_job(job, base, cfg, root, resume, progress)
        progress.finish(job, entry)
        if state.is_main_process:
            _record(manifest, job, entry)
            library.write_manifest(root, manifest)
        state.wait_for_everyone()
    if state.is_main_process:
        manifest["complete"] = True
        library.write_manifest(root, manifest)
        shutil.rmtree(root / WORK, ignore_errors=True)
    progress.close()
    state.wait_for_everyone()
    return root
