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
from chainlora.library import kinds, store
from chainlora.train import changes, cola, gate, selection, staging
from chainlora.train.config import Config
from chainlora.train.distributed import on_main  # noqa: F401  (the API: chainlora.train.run.on_main)
from chainlora.train.plan import (Job, Plan, gate_records, load_data, load_with_discovery, plan_finetune,  # noqa: F401
                                  plan_train, selector_split, task_splits)
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


def train_library(cfg: Config, out: str | Path | None = None, *, resume: bool = False,
                  force: bool = False, finetune: bool = False, dry_run: bool = False) -> Path:
    """Bring the library at `out` up to date with the config; return its path.

    Keeps every adapter whose fingerprint matches, trains new and changed ones, removes those
    no longer configured (chainlora.train.changes); prints the plan first. force=True retrains all;
    dry_run=True prints the plan and changes nothing. finetune=True trains ONE adapter on all
    selected tasks (no router, classifier or mixed).
    """
    from accelerate import PartialState

    from chainlora.base_model import load_base

    state = PartialState(cpu=use_cpu())  # torch.distributed under accelerate launch / torchrun
    root = staging.resolve_root(out or cfg.output_dir)
    staging.check_target(root)  # a file in the path, a folder we did not write: before any work
    data, discovery = load_with_discovery(cfg)  # check data before loading a model: bad input fails fast
    plan = (plan_finetune if finetune else plan_train)(cfg, data, state.num_processes)
    build = staging.Build(root, resume, force)
    base, base_fp, fingerprints = _fingerprints(cfg, state.num_processes)
    if not finetune and not force:
        plan = _keep_trunk(cfg, data, state.num_processes, plan, build.manifest, fingerprints)
    prints = fingerprints(plan.jobs)
    todo = changes.decide(plan.jobs, prints, root, build.manifest, build.partial, build.earlier, force)
    blocks = {"selection": _selection_fp(cfg, plan, prints), "gate": _gate_fp(cfg, plan, prints)}
    state.wait_for_everyone()  # every process has read the disk before the main one writes to it
    current = _current(build.manifest, todo, root, blocks)
    if state.is_main_process and (dry_run or not current):
        print(changes.format_plan(root, todo), flush=True)
    if dry_run:
        return root
    digest = _config_digest(cfg, finetune, discovery)
    if current:
        on_main(state, lambda: build.refresh(digest, cfg.to_dict(), todo, _seen(data)))
        return root
    base = base or load_base(cfg.base_model, dtype=cfg.dtype)
    new = store.new_manifest(cfg.base_model, base_fp, cfg.to_dict(), digest, cfg.system_prompt)
    new.update(discovery=discovery, forced=changes.forced(force, build.earlier))  # a resumed --force stays one
    on_main(state, lambda: build.start(new, todo))
    _train_jobs([c for c in todo if c.job is not None], build, base, cfg, resume and build.continuing, state)
    _measure_blocks(build, plan, base, cfg, blocks, force, state)
    on_main(state, lambda: build.finish([j.path for j in plan.jobs], todo, _seen(data)))
    return root


def _fingerprints(cfg: Config, world_size: int) -> tuple[Any, str, Callable]:
    """(the base model when its fingerprint needed loading it, else None; the base model's
    fingerprint; jobs -> {path: fingerprint})."""
    from chainlora.base_model import base_fingerprint, load_base, tokenizer_digest

    base, base_fp = None, base_fingerprint(cfg.base_model)
    if base_fp is None:  # a hub model: only loading it tells its revision
        base = load_base(cfg.base_model, dtype=cfg.dtype)
        base_fp = base.fingerprint
    return base, base_fp, _fingerprinter(cfg, base_fp, world_size, tokenizer_digest(cfg.base_model))


def _config_digest(cfg: Config, finetune: bool, discovery: dict | None) -> str:
    """The manifest's config_sha256; with `tasks: auto` a different clustering is a different library."""
    digest = cfg.digest() if not finetune else store.files_sha256([("finetune", cfg.digest().encode())])
    if discovery is not None:
        digest = store.files_sha256([("config", digest.encode()), ("discovery", discovery["assignments_sha256"].encode())])
    return digest


def _selection_fp(cfg: Config, plan: Plan, prints: dict) -> str | None:
    """What decides the `selection` block (None: `chainlora finetune`, nothing to choose)."""
    if plan.split is None:
        return None
    return selection.fingerprint(cfg, plan.split, {j.kind: prints[j.path]["sha256"] for j in plan.jobs
                                                   if kinds.ENTRIES[j.kind].selector})


def _gate_fp(cfg: Config, plan: Plan, prints: dict) -> str | None:
    """What decides the `gate` block (None: the gate is off or holds nothing out)."""
    if not cfg.chain.gate or plan.split is None or not any(plan.gate.values()):
        return None
    return gate.fingerprint(plan.gate, {j.path: prints[j.path]["sha256"] for j in plan.of_kind("task", "mixed")},
                            cfg.system_prompt)


def _current(manifest: dict | None, todo: list[changes.Change], root: Path, blocks: dict) -> bool:
    """The library is complete, every adapter kept from it, its measurements made for this plan."""
    return (bool(manifest and manifest.get("complete")) and changes.up_to_date(todo, root)
            and all(_block_of(manifest, k, fp) == (manifest or {}).get(k) for k, fp in blocks.items()))


def _seen(data: dict) -> list[str]:
    """Digests of every prompt in the training split (LIB/seen.json, what `chainlora eval` leaves out)."""
    from chainlora.data.records import prompt_digest

    return sorted({prompt_digest(r) for d in data.values() for r in d.train})


def _keep_trunk(cfg: Config, data: dict, world_size: int, plan: Plan, manifest: dict | None,
                fingerprints: Callable) -> Plan:
    """Tasks were only added: keep the library's trunk (trained on the earlier tasks, otherwise
    unchanged) and let the new tasks branch from it, rather than retrain every branch. Plans
    again only in that case, with the trunk on the earlier tasks (the branches' schedules follow it)."""
    old = (manifest or {}).get("trunk")
    earlier = (old or {}).get("tasks") or []
    if not old or not set(earlier) < set(plan.names):
        return plan
    alt = plan_train(cfg, data, world_size, trunk_tasks=earlier)
    trunk = alt.of_kind("trunk")
    same = trunk and fingerprints(trunk)[trunk[0].path]["sha256"] == (old.get("fingerprint") or {}).get("sha256")
    return alt if same else plan


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


def _fingerprinter(cfg: Config, base_fp: str, world_size: int, tokenizer: str | None) -> Callable:
    """jobs -> {path: fingerprint}, in plan order: a branch's fingerprint includes its trunk's."""
    def fingerprints(jobs: list[Job]) -> dict[str, dict]:
        prints: dict[str, dict] = {}
        for j in jobs:
            prints[j.path] = changes.fingerprint(j, cfg, base_fp, world_size, tokenizer,
                                                 prints.get(j.start) if j.start else None)
        return prints

    return fingerprints


def _runner(job: Job, resume: bool, fingerprint: dict) -> Callable:
    """The job's trainer: its kind's registered `train` function, else the LoRA runner (run_job)."""
    train = kinds.ENTRIES[job.kind].train
    if train:
        return kinds.resolve(train)
    return lambda job, base, cfg, root, progress: run_job(job, base, cfg, root, resume, progress, fingerprint)


def _train_jobs(todo: list[changes.Change], build: staging.Build, base: Any, cfg: Config, resume: bool,
                state: Any) -> None:
    """Train every planned adapter (or count the ones an earlier run finished) into the partial
    library, the manifest rewritten after each; one progress bar and summary over all of them."""
    progress = RunProgress([c.job for c in todo], enabled=state.is_main_process)
    for c in todo:
        if c.action == "keep":
            progress.skip(c.job, c.entry, "earlier run" if c.reason == changes.EARLIER_RUN else "kept")
            continue
        entry = _runner(c.job, resume, c.fingerprint)(c.job, base, cfg, build.partial, progress)
        entry["fingerprint"] = c.fingerprint
        progress.finish(c.job, entry)
        on_main(state, lambda: build.add(c.job.kind, c.job.path, entry))
    progress.close()


def _measure_blocks(build: staging.Build, plan: Plan, base: Any, cfg: Config, blocks: dict, force: bool,
                    state: Any) -> None:
    """The selectors measured on validation data (the default chosen), and `chain.gate`'s verdicts:
    each kept when the library measured it for this very plan."""
    new, partial = build.new, build.partial
    if plan.split is not None:
        new["selection"] = _measured(build.manifest, "selection", blocks["selection"], force, state, lambda: selection.measure(
            partial, new, base, cfg, plan.split, blocks["selection"]),
            "measuring the selectors on validation data no selector trained on ...")
        _print_selection(new["selection"], state.is_main_process)
    if blocks["gate"] is not None:
        new["gate"] = _measured(build.manifest, "gate", blocks["gate"], force, state,
                                lambda: gate.measure(partial, new, base, cfg, plan.gate, blocks["gate"]))
        if state.is_main_process and gate.summary(new["gate"]):
            print(gate.summary(new["gate"]), flush=True)


def _measured(manifest: dict | None, key: str, fp: str | None, force: bool, state: Any, measure: Callable,
              announce: str | None = None) -> dict | None:
    """The library's `selection` / `gate` block: kept when measured for this very fingerprint
    (and not --force), else measured now on the main process."""
    kept = _block_of(manifest, key, fp) if not force else None
    if kept is None and announce and state.is_main_process:
        print(announce, flush=True)
    return on_main(state, lambda: kept or measure())
