"""`chainlora train`: the routed chain's adapters, trained one after another into a library.

A run is a plan of jobs (chainlora.train.plan) — one LoRA per task (M_t), the task-selection
LoRA (P) and the mixed-task baseline (M_mix) — executed by transformers' Trainer on ONE base
model loaded once: each job wraps the base with `get_peft_model`, trains, saves the adapter
atomically into the library, and `unload()`s the LoRA layers so the next job starts from the
untouched base. The Trainer brings gradient accumulation, bf16/fp16, checkpoints, logging and
accelerate/torchrun multi-process training; only the main process writes the library.

Incremental: the jobs are compared with the library on disk by fingerprint
(chainlora.train.changes): unchanged adapters are kept without model work, new and changed ones
trained. The new library is built beside the old one and swapped in when complete
(chainlora.train.staging), so the old one serves until then and an interrupted run loses nothing.

After the adapters: the selectors are measured on validation records (chainlora.train.selection)
and, with `chain.gate`, each task adapter against the mixed adapter (chainlora.train.gate).

Resume: each job checkpoints into .LIB.partial/.work/<job>/; the partial manifest is rewritten
after every finished adapter. `--resume` keeps finished adapters (fingerprint- and hash-checked)
and continues the job in progress from its last complete Trainer checkpoint (RNG, optimizer,
data order included).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from chainlora.data.examples import build_dataset, collator
from chainlora.errors import ChainloraError
from chainlora.inference.calibration import fallback_warning
from chainlora.library import store
from chainlora.train import changes, cola, gate, selection, selectors, staging
from chainlora.train.config import Config
from chainlora.train.distributed import on_main  # noqa: F401  (the API: chainlora.train.run.on_main)
from chainlora.train.plan import (Job, gate_records, load_data, load_with_discovery, plan_finetune, plan_train,  # noqa: F401
                                  selector_split, task_splits)
from chainlora.train.arguments import early_stopping, stopping_facts, training_args, use_cpu  # noqa: F401
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
    work, tok = root / staging.WORK / job.path.replace("/", "-"), base.tokenizer
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
                      lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
                      init_lora_weights=True if not job.link_plan or c.init == "kaiming" else "gaussian",
                      task_type="CAUSAL_LM")
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
    if test_ds is not None:
        entry["test_loss"] = round(trainer.evaluate(test_ds)["eval_loss"], 5)
        if job.kind == "task":
            with model.disable_adapter():
                entry["base_test_loss"] = round(trainer.evaluate(test_ds)["eval_loss"], 5)
    entry["sha256"] = on_main(state, lambda: store.save_adapter(model, root, job.path))
    base.model = model.unload()  # the LoRA layers go; base weights were never touched
    return entry


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


# --------------------------------------------------------------------------- the run


def _record(manifest: dict, job: Job, entry: dict) -> None:
    if job.kind == "task":
        manifest["tasks"] = [e for e in manifest["tasks"] if e["path"] != job.path] + [entry]
    else:
        manifest[job.kind] = entry


def _keep_trunk(cfg: Config, data: dict, world_size: int, jobs: list[Job], prints: dict,
                manifest: dict | None, fingerprints: Callable) -> tuple[list[Job], dict]:
    """Tasks were only added: keep the library's trunk (trained on the earlier tasks, otherwise
    unchanged) and let the new tasks branch from it, rather than retrain every branch."""
    old = (manifest or {}).get("trunk")
    names = [j.name for j in jobs if j.kind == "task"]
    earlier = (old or {}).get("tasks") or []
    if not old or not set(earlier) < set(names):
        return jobs, prints
    alt = plan_train(cfg, data, world_size, trunk_tasks=earlier)
    alt_prints = fingerprints(alt)
    if alt_prints["trunk"]["sha256"] != (old.get("fingerprint") or {}).get("sha256"):
        return jobs, prints
    return alt, alt_prints


def _refresh(root: Path, manifest: dict, cfg: Config, digest: str, plan_: list[changes.Change]) -> None:
    """Main process, nothing to train: record a config that changed only in keys that do not
    decide any adapter (labels, logging, ...), atomically; say which it was."""
    if manifest.get("config_sha256") == digest:
        print(f"{root}: already trained with this config (use --force to retrain)")
        return
    for c in plan_:
        _record(manifest, c.job, {**c.entry, **c.job.info})
    manifest.update(training=cfg.to_dict(), config_sha256=digest)
    store.write_manifest(root, manifest)
    print(f"{root}: every adapter is up to date; the manifest now records the new config")


def _block_of(manifest: dict | None, key: str, fp: str | None) -> dict | None:
    """The library's recorded `selection` or `gate` when it was measured for this very fingerprint."""
    block = (manifest or {}).get(key)
    return block if fp is not None and block and block.get("fingerprint") == fp else None


def _print_selection(sel: dict | None, main: bool) -> None:
    if not sel or not main:
        return
    parts = [f"{k} {r['heldout_top1'] if r['heldout_top1'] is not None else r['top1']:.1%}"
             for k, r in sel["selectors"].items()]
    w = sel["selectors"][sel["winner"]]
    print(f"selectors on held-out validation: {', '.join(parts)}; default: {sel['winner']} "
          f"(threshold {w['threshold']:.3f}: {w['fallback_rate']:.1%} fall back)", flush=True)
    warning = fallback_warning(sel)
    if warning:
        print(f"chainlora: {warning}", file=sys.stderr, flush=True)


def write_seen(root: Path, data: dict) -> None:
    """LIB/seen.json: a digest of every prompt in the training split (whatever adapter or selector
    used it), so `chainlora eval` can leave training records out of a file it is given."""
    from chainlora import atomic
    from chainlora.data.records import prompt_digest

    digests = sorted({prompt_digest(r) for d in data.values() for r in d.train})
    atomic.write_json(root / store.SEEN, {"key": "sha256(instruction + NUL + input)[:16]", "digests": digests})


def train_library(cfg: Config, out: str | Path | None = None, *, resume: bool = False,
                  force: bool = False, finetune: bool = False, dry_run: bool = False) -> Path:
    """Bring the library at `out` up to date with the config; return its path.

    Keeps every adapter whose fingerprint matches, trains new and changed ones, removes those
    no longer configured (chainlora.train.changes); prints the plan first. force=True retrains all;
    dry_run=True prints the plan and changes nothing. finetune=True trains ONE adapter on all
    selected tasks (no router, classifier or mixed).
    """
    from accelerate import PartialState

    from chainlora.models import base_fingerprint, load_base, tokenizer_digest

    state = PartialState(cpu=use_cpu())  # torch.distributed under accelerate launch / torchrun
    root = staging.resolve_root(out or cfg.output_dir)
    staging.check_target(root)  # a file in the path, a folder we did not write: before any work
    digest = cfg.digest() if not finetune else store.files_sha256([("finetune", cfg.digest().encode())])
    data, discovery = load_with_discovery(cfg)  # check data before loading a model: bad input fails fast
    if discovery is not None:  # tasks: auto: a different clustering is a different library
        digest = store.files_sha256([("config", digest.encode()), ("discovery", discovery["assignments_sha256"].encode())])
    jobs = plan_finetune(cfg, data, state.num_processes) if finetune else plan_train(cfg, data, state.num_processes)
    partial = staging.partial_dir(root)
    manifest = store.read_manifest(root) if root.is_dir() else None
    earlier = store.read_manifest(partial) if partial.is_dir() else None
    continuing = staging.check_partial(partial, earlier, resume, force)
    base = None
    base_fp = base_fingerprint(cfg.base_model)
    if base_fp is None:  # a hub model: only loading it tells its revision
        base = load_base(cfg.base_model, dtype=cfg.dtype)
        base_fp = base.fingerprint
    fingerprints = _fingerprinter(cfg, base_fp, state.num_processes, tokenizer_digest(cfg.base_model))
    prints = fingerprints(jobs)
    if not finetune and not force:
        jobs, prints = _keep_trunk(cfg, data, state.num_processes, jobs, prints, manifest, fingerprints)
    plan_ = changes.decide(jobs, prints, root, manifest, partial, earlier if continuing else None, force)
    split = selector_split(cfg, task_splits(cfg, data)[1]) if not finetune else None
    sel_fp = (selection.fingerprint(cfg, split, {j.kind: prints[j.path]["sha256"] for j in jobs
                                                if j.kind in ("router", "classifier", "encoder", "sft")})
              if split else None)
    state.wait_for_everyone()  # every process has read the disk before the main one writes to it
    held = gate_records(cfg, data) if cfg.chain.gate and not finetune else {}
    gate_fp = gate.fingerprint(held, {j.path: prints[j.path]["sha256"] for j in jobs if j.kind in ("task", "mixed")},
                               cfg.system_prompt) if held else None
    current = (bool(manifest and manifest.get("complete")) and changes.up_to_date(plan_, root)
               and _block_of(manifest, "selection", sel_fp) == (manifest or {}).get("selection")
               and _block_of(manifest, "gate", gate_fp) == (manifest or {}).get("gate"))
    if state.is_main_process and (dry_run or not current):
        print(changes.format_plan(root, plan_), flush=True)
    if dry_run:
        return root
    if current:
        on_main(state, lambda: (_refresh(root, manifest, cfg, digest, plan_), write_seen(root, data),
                                shutil.rmtree(partial) if partial.exists() else None))
        return root

    if base is None:
        base = load_base(cfg.base_model, dtype=cfg.dtype)
    new = store.new_manifest(cfg.base_model, base_fp, cfg.to_dict(), digest, cfg.system_prompt)
    new["discovery"] = discovery
    new["forced"] = changes.forced(force, earlier if continuing else None)  # a resumed --force stays one
    for c in plan_:
        if c.action == "keep":
            _record(new, c.job, {**c.entry, **c.job.info, "path": c.path})
    on_main(state, lambda: staging.prepare(partial, new, plan_, not continuing, earlier))
    _train_jobs([c for c in plan_ if c.job is not None], new, base, cfg, partial, resume and continuing, state)
    if split is not None:
        new["selection"] = _measured(manifest, "selection", sel_fp, force, state, lambda: selection.measure(
            partial, new, base, cfg, split, sel_fp), "measuring the selectors on validation data no selector trained on ...")
        _print_selection(new["selection"], state.is_main_process)
    if held:
        new["gate"] = _measured(manifest, "gate", gate_fp, force, state,
                                lambda: gate.measure(partial, new, base, cfg, held, gate_fp))
        if state.is_main_process and gate.summary(new["gate"]):
            print(gate.summary(new["gate"]), flush=True)
    on_main(state, lambda: _complete(partial, root, new, jobs, plan_, data))
    return root


def _fingerprinter(cfg: Config, base_fp: str, world_size: int, tokenizer: str | None) -> Callable:
    """jobs -> {path: fingerprint}, in plan order: a branch's fingerprint includes its trunk's."""
    def fingerprints(jobs: list[Job]) -> dict[str, dict]:
        prints: dict[str, dict] = {}
        for j in jobs:
            prints[j.path] = changes.fingerprint(j, cfg, base_fp, world_size, tokenizer,
                                                 prints.get(j.start) if j.start else None)
        return prints

    return fingerprints


def _train_jobs(todo: list[changes.Change], new: dict, base: Any, cfg: Config, partial: Path, resume: bool,
                state: Any) -> None:
    """Train every planned adapter (or count the ones an earlier run finished) into the partial
    library, the manifest rewritten after each; one progress bar and summary over all of them."""
    progress = RunProgress([c.job for c in todo], enabled=state.is_main_process)
    for c in todo:
        if c.action == "keep":
            progress.skip(c.job, c.entry, "earlier run" if c.reason == changes.EARLIER_RUN else "kept")
            continue
        if c.job.kind in ("classifier", "encoder", "sft"):
            entry = selectors.run_selector_job(c.job, base, cfg, partial, progress)
        else:
            entry = run_job(c.job, base, cfg, partial, resume, progress, c.fingerprint)
        entry["fingerprint"] = c.fingerprint
        progress.finish(c.job, entry)
        on_main(state, lambda: (_record(new, c.job, entry), store.write_manifest(partial, new)))
    progress.close()


def _measured(manifest: dict | None, key: str, fp: str | None, force: bool, state: Any, measure: Callable,
              announce: str | None = None) -> dict | None:
    """The library's `selection` / `gate` block: kept when measured for this very fingerprint
    (and not --force), else measured now on the main process."""
    kept = _block_of(manifest, key, fp) if not force else None
    if kept is None and announce and state.is_main_process:
        print(announce, flush=True)
    return on_main(state, lambda: kept or measure())


def _complete(partial: Path, root: Path, new: dict, jobs: list[Job], plan_: list[changes.Change], data: dict) -> None:
    """Main process: mark the partial library complete (tasks in plan order) and swap it in."""
    write_seen(partial, data)
    order = [j.path for j in jobs]
    new["tasks"].sort(key=lambda e: order.index(e["path"]))
    new["complete"] = True
    new.pop("forced")
    store.write_manifest(partial, new)
    for note in staging.finish(partial, root, plan_):
        print(note)
