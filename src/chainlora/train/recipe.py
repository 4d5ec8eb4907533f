"""`chainlora train`: the routed chain's adapters, trained one after another into a library.

`train_library` reads top to bottom: load the data, plan the jobs (chainlora.train.plan, one
`Plan`), open the build (chainlora.train.staging.Build), compare every job with the library on
disk by fingerprint (chainlora.train.changes: unchanged adapters are kept without model work),
train what changed — LoRA jobs with chainlora.train.lora_job, the other selector kinds with the
function chainlora.library.kinds registers for them — measure the selectors on validation
records (chainlora.train.selection) and, with `chain.gate`, each task adapter against the mixed
adapter (chainlora.train.gate), then swap the finished library in. The old library serves until
then and an interrupted run loses nothing; `--resume` continues it. Only the main process writes
(accelerate launch / torchrun run several).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from chainlora.inference.calibration import fallback_warning
from chainlora.library import kinds, store
from chainlora.train import changes, gate, selection, staging
from chainlora.train.config import Config
from chainlora.train.distributed import on_main
from chainlora.train.plan import (Job, Plan, gate_records, load_data, load_with_discovery, plan_finetune,  # noqa: F401
                                  plan_train, selector_split, task_splits)
from chainlora.train.arguments import early_stopping, stopping_facts, training_args, use_cpu  # noqa: F401
from chainlora.train.lora_job import (CHECKPOINT_FILES, FINGERPRINT_FILE, last_checkpoint,  # noqa: F401  (the API)
                                      relabel_work, run_job)
from chainlora.train.progress import RunProgress

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
    by_version = _by_version(fingerprints, plan.jobs)
    prints = by_version(changes.FINGERPRINT_VERSION)
    todo = changes.decide(plan.jobs, by_version, root, build.manifest, build.partial, build.earlier, force)
    blocks = {"selection": _selection_fp(cfg, plan, prints), "gate": _gate_fp(cfg, plan, prints)}
    _upgrade_blocks(build.manifest, blocks, cfg, plan, by_version)
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
    base = base or load_base(cfg.base_model, dtype=cfg.dtype, quantization=cfg.base_quantization)
    new = store.new_manifest(cfg.base_model, base_fp, cfg.to_dict(), digest, cfg.system_prompt)
    new.update(discovery=discovery, forced=changes.forced(force, build.earlier))  # a resumed --force stays one
    on_main(state, lambda: build.start(new, todo))
    if resume and build.continuing:  # an interrupted adapter's checkpoints, labelled by an older chainlora
        on_main(state, lambda: _relabel(todo, build.partial, by_version))
    _train_jobs([c for c in todo if c.job is not None], build, base, cfg, resume and build.continuing, state)
    _measure_blocks(build, plan, base, cfg, blocks, force, state)
    on_main(state, lambda: build.finish([j.path for j in plan.jobs], todo, _seen(data)))
    return root


def _fingerprints(cfg: Config, world_size: int) -> tuple[Any, str, Callable]:
    """(the base model when its fingerprint needed loading it, else None; the base model's
    fingerprint; (jobs, version) -> {path: fingerprint})."""
    from chainlora.base_model import base_fingerprint, config_digest, load_base, tokenizer_digest

    base, base_fp = None, base_fingerprint(cfg.base_model)
    if base_fp is None:  # a hub model: only loading it tells its revision
        base = load_base(cfg.base_model, dtype=cfg.dtype, quantization=cfg.base_quantization)
        base_fp = base.fingerprint
    files = changes.BaseFiles(base_fp, tokenizer_digest(cfg.base_model), config_digest(cfg.base_model))
    return base, base_fp, _fingerprinter(cfg, files, world_size)


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


def _upgrade_blocks(manifest: dict | None, blocks: dict, cfg: Config, plan: Plan, by_version: Callable) -> None:
    """A `selection` / `gate` block an older chainlora measured, keyed by its version's fingerprints
    of these very adapters, is carried over under the current key (in the manifest as read):
    measuring it again would give the same, so upgrading measures nothing."""
    for key, fp in blocks.items():
        block = (manifest or {}).get(key)
        if fp is None or not block or block.get("fingerprint") == fp:
            continue
        keyed = {"selection": _selection_fp, "gate": _gate_fp}[key]
        if any(block.get("fingerprint") == keyed(cfg, plan, by_version(v)) for v in changes.OLDER_VERSIONS):
            manifest[key] = {**block, "fingerprint": fp}


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
    same = trunk and changes.matches(old, trunk[0].path, _by_version(fingerprints, trunk))
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


def _fingerprinter(cfg: Config, base: changes.BaseFiles, world_size: int) -> Callable:
    """(jobs, version) -> {path: fingerprint}, in plan order: a branch's fingerprint includes its trunk's."""
    def fingerprints(jobs: list[Job], version: int = changes.FINGERPRINT_VERSION) -> dict[str, dict]:
        prints: dict[str, dict] = {}
        for j in jobs:
            prints[j.path] = changes.fingerprint(j, cfg, base, world_size,
                                                 prints.get(j.start) if j.start else None, version)
        return prints

    return fingerprints


def _by_version(fingerprints: Callable, jobs: list[Job]) -> Callable[[int], dict[str, dict]]:
    """version -> the jobs' fingerprints by that version's rule, each rule computed once (an
    older rule only for a library an older chainlora wrote)."""
    cache: dict[int, dict[str, dict]] = {}

    def prints(version: int) -> dict[str, dict]:
        if version not in cache:
            cache[version] = fingerprints(jobs, version)
        return cache[version]

    return prints


def _relabel(todo: list[changes.Change], partial: Path, by_version: Callable[[int], dict[str, dict]]) -> None:
    """Let --resume continue the checkpoints of a job an older version's fingerprint labelled."""
    for c in todo:
        if c.job is not None and c.action != "keep" and kinds.ENTRIES[c.job.kind].lora:
            older = [by_version(v)[c.path]["sha256"] for v in changes.OLDER_VERSIONS]
            relabel_work(partial, c.job, older, c.fingerprint)


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
