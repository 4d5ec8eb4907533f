"""One LoRA job (a task adapter, the trunk, the task-selection LoRA, the mixed adapter), trained
by transformers' Trainer on the run's one base model: `get_peft_model`, train, save atomically
into the library, `unload()` so the next job starts from the untouched base. A branch starts
from the trunk (warm: its LoRA weights; residual: merged as a COLA link); `method: cola` adds
the residual chain's callback (chainlora.train.cola).

Resume: each job checkpoints into .LIB.partial/.work/<job>/, labelled with the job's
fingerprint; only a complete checkpoint of this very job is continued (RNG, optimizer, data
order included).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from chainlora import atomic
from chainlora.data.examples import build_dataset, collator
from chainlora.errors import ChainloraError
from chainlora.library import store
from chainlora.train import cola, staging, targets
from chainlora.quantization import prepare_for_training
from chainlora.train.arguments import early_stopping, end_checkpointing, stopping_facts, training_args
from chainlora.train.config import Config
from chainlora.train.distributed import on_main
from chainlora.train.jobs import Job
from chainlora.train.progress import RunProgress

FINGERPRINT_FILE = "fingerprint.txt"  # in a job's work directory: which job its checkpoints are of
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt")


# --------------------------------------------------------------------------- one job


def last_checkpoint(work: Path, files: tuple[str, ...] = CHECKPOINT_FILES) -> Path | None:
    """The newest COMPLETE Trainer checkpoint in `work`: `files` all there (trainer_state.json
    is the Trainer's last write; a COLA job's links follow it, so they are required too)."""
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


def _resumable(work: Path, files: tuple[str, ...], fingerprint: dict) -> Path | None:
    """The checkpoint to continue: only one made for this very job (same fingerprint)."""
    try:
        if (work / FINGERPRINT_FILE).read_text().strip() != fingerprint["sha256"]:
            return None
    except OSError:
        return None
    return last_checkpoint(work, files)


def work_dir(root: Path, job: Job) -> Path:
    """Where a LoRA job keeps its Trainer checkpoints, inside the partial library."""
    return root / staging.WORK / job.path.replace("/", "-")


def relabel_work(root: Path, job: Job, older: list[str], fingerprint: dict) -> None:
    """Main process: checkpoints an older chainlora labelled with its version's fingerprint of
    this very job continue under --resume: they are relabelled with the current fingerprint."""
    label = work_dir(root, job) / FINGERPRINT_FILE
    try:
        found = label.read_text().strip()
    except OSError:
        return
    if found in older:
        atomic.write_text(label, fingerprint["sha256"] + "\n")


def _fresh_work(work: Path, fingerprint: dict) -> None:
    """Main process: an empty work directory for a job, labelled with its fingerprint."""
    if work.exists():
        shutil.rmtree(work)  # stale work of an earlier, abandoned attempt
    work.mkdir(parents=True)
    (work / FINGERPRINT_FILE).write_text(fingerprint["sha256"] + "\n")


def run_job(job: Job, base: Any, cfg: Config, root: Path, resume: bool, progress: RunProgress,
            fingerprint: dict) -> dict:
    """Train one adapter on `base`, save it into the library at `root`, restore the base; return
    its entry. Only the main process touches the work directory and writes the library."""
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, set_seed
    from transformers.trainer_callback import ProgressCallback

    state = PartialState()
    work, tok = work_dir(root, job), base.tokenizer
    residual = job.start is not None and job.branch == "residual"
    files = CHECKPOINT_FILES + ((cola.STATE_FILE,) if job.link_plan or residual else ())

    def pick() -> str | None:  # the main process decides, so every process resumes alike
        found = _resumable(work, files, fingerprint) if resume else None
        if found is None:
            _fresh_work(work, fingerprint)
        return str(found) if found else None

    found = on_main(state, pick)
    checkpoint = Path(found) if found else None
    set_seed(job.settings.seed)  # same LoRA init whether or not earlier jobs ran in this process
    c = job.settings.cola
    lora = LoraConfig(r=job.link_plan.ranks[0] if job.link_plan else cfg.lora.r, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, use_rslora=cfg.lora.use_rslora,
                      target_modules=targets.peft_targets(cfg.lora.target_modules), task_type="CAUSAL_LM",
                      init_lora_weights=True if not job.link_plan or c.init == "kaiming" else "gaussian")
    restore = prepare_for_training(base.model, cfg.base_quantization, f"{cfg.source}: base_quantization")
    targets.check(base.model, cfg.lora.target_modules, str(cfg.source))
    try:
        model = get_peft_model(base.model, lora)
    except ValueError as e:
        raise ChainloraError(f"{cfg.source}: lora.target_modules: {e}".splitlines()[0])
    cola_cb = cola.ColaCallback(model, job.link_plan, c, cfg.lora.alpha) if job.link_plan else None
    if job.start is not None:
        cola_cb = _start_from(model, store.inside(root, job.start), job, cfg, checkpoint) or cola_cb
    system = cfg.system_prompt
    train_ds = build_dataset(tok, job.train, job.settings.max_length, system)
    test_ds = build_dataset(tok, job.test, job.settings.max_length, system) if job.test else None
    stopping = early_stopping(job)
    val_ds = build_dataset(tok, job.validation, job.settings.max_length, system) if stopping is not None else None
    trainer = Trainer(model=model, args=training_args(job, work, root / "logs" / job.name),
                      train_dataset=train_ds, eval_dataset=val_ds, data_collator=collator(tok),
                      callbacks=[progress.callback(job)] + ([cola_cb] if cola_cb else []) + (stopping or []))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress.step_bar())
    t0 = time.perf_counter()
    try:
        if cola_cb and checkpoint:
            cola_cb.load(checkpoint)
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException:
        if cola_cb:
            cola_cb.restore_base()  # the next job in this process must see W0, not merged links
        raise
    seconds = time.perf_counter() - t0
    entry = {**job.info, "path": job.path, "n_train": len(job.train), "n_test": len(job.test),
             "steps": job.steps, "tokens": int(trainer.state.num_input_tokens_seen),
             "train_loss": round(result.training_loss, 5), "seconds": round(seconds, 1),
             "loss_curve": [[h["step"], round(h["loss"], 5)] for h in trainer.state.log_history
                            if "loss" in h]}
    if val_ds is not None:  # the Trainer has loaded the best checkpoint's weights (load_best_model_at_end)
        entry["steps"] = trainer.state.global_step  # an early stop ran fewer steps than planned
        entry["early_stopping"] = stopping_facts(trainer.state, job)
    if cola_cb:  # from here on the model is W0 + one plain LoRA equal to the sum of the links
        facts = cola_cb.export(c.compress_rank, f"{cfg.source}: {job.section}.cola.compress_rank")
        if residual:  # trunk ⊕ residual, one LoRA of rank r_trunk + r
            entry["branch"] = {**entry["branch"], "ranks": facts["ranks"], "export_rank": facts["export_rank"]}
        else:
            entry["cola"] = facts
    entry.update(_test_losses(trainer, model, test_ds, job))
    entry["sha256"] = on_main(state, lambda: store.save_adapter(model, root, job.path))
    base.model = model.unload()  # the LoRA layers go; base weights were never touched
    end_checkpointing(base.model)  # the next job's Trainer turns it on again if it asks for it
    restore()  # a quantised base: its norms and embeddings back in the dtype they were loaded in
    return entry


def _test_losses(trainer: Any, model: Any, test_ds: Any, job: Job) -> dict:
    """The adapter's loss on the job's test records and, for a task, the base model's."""
    if test_ds is None:
        return {}
    losses = {"test_loss": round(trainer.evaluate(test_ds)["eval_loss"], 5)}
    if job.kind == "task":
        with model.disable_adapter():
            losses["base_test_loss"] = round(trainer.evaluate(test_ds)["eval_loss"], 5)
    return losses


def _start_from(model: Any, trunk: Path, job: Job, cfg: Config, checkpoint: Path | None) -> Any:
    """A branch starts where the trunk ended. warm: the trunk's LoRA weights are loaded into the
    job's LoRA. residual: the trunk is merged into the weights as a tied COLA link and the job's
    fresh LoRA learns the residual; returns that ColaCallback (it exports trunk ⊕ residual).
    A resumed job's checkpoint then overrides what is set here, as for any job."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from chainlora.train.config import ColaSettings

    if job.branch == "residual":
        cb = cola.ColaCallback(model, cola.LinkPlan([], [cfg.lora.r, cfg.lora.r]), ColaSettings(), cfg.lora.alpha)
        if checkpoint is None:
            cb.seed(trunk)
        return cb
    loaded = set_peft_model_state_dict(model, load_file(str(trunk / store.ADAPTER_FILES[1])))
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if loaded.unexpected_keys or missing:
        raise ChainloraError(f"{trunk}: the trunk does not fit this adapter (LoRA settings changed?): "
                             f"{(loaded.unexpected_keys or missing)[0]}")
    return None
