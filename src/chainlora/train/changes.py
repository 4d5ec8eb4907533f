"""What a training run changes in a library: keep, train, retrain or remove each adapter.

Every adapter's manifest entry records a fingerprint: sha256 digests of everything that decides
its weights — the base model (weights, tokenizer, a local model's config.json), its training
settings and step count, its LoRA (or classifier) settings, the prompt it was trained with, and
the exact training examples it saw, in order.
`chainlora train` compares the planned jobs with the library on disk:

    keep     same fingerprint and the files still hash to the manifest: no model work
    train    an adapter the library does not have yet (a new task, a newly enabled selector)
    retrain  the fingerprint changed (the reason names which part), --force, or bad files
    remove   in the library but no longer in the config

So adding a task trains that task's adapter plus whatever depends on the task set (the
selectors, and the mixed baseline whose data grew); editing one task's records retrains that
adapter plus the same dependants; the other task adapters are kept byte for byte. Branches of
a shared trunk (chain.branch) carry the trunk's fingerprint: a retrained trunk retrains them.
Test examples do not enter the fingerprint: they do not change an adapter's weights.
The classifier and encoder selectors train by their own sections' keys: of `training` only the
seed is theirs, so tuning the task adapters' learning rate or steps keeps them.
Memory features: `base_quantization` is part of the base model (a 4-bit base is other weights);
mixed precision is a training setting (`precision: auto` as what it means on this machine);
`gradient_checkpointing` is not in: it recomputes the same activations with the same dropout
masks (the RNG state is replayed), so the weights are the same (tests/test_memory_features.py).

Versions: a fingerprint records the rule that made it. Version 2 adds a local model's
config.json to the base model and `eval_batch_size` to a job that stops on validation records,
and leaves out what cannot change the weights (`training.cola` under `method: lora`, but for a
residual branch's `compress_rank`; early stopping for a job without validation records; `epochs`
and `max_steps`: the step count is in; the base model for a selector over its own encoder). An
entry an older chainlora wrote is compared by its own version's rule (kept in `_rule`), and a
kept one is rewritten with the current fingerprint: upgrading retrains nothing that did not change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from chainlora.errors import ChainloraError
from chainlora.library import kinds, store
from chainlora.train.arguments import resolved_precision
from chainlora.train.config import Config
from chainlora.train.plan import Job

FINGERPRINT_VERSION = 2
OLDER_VERSIONS = (1,)  # rules still known: an entry of one of them is compared by it, then upgraded
# Settings that change how a run is logged or checkpointed, never the weights it produces.
# eval_batch_size is the exception under early stopping: the Trainer's validation loss is a mean
# of batch means, so the batching can move the chosen checkpoint. Version 2 holds it for a job
# that stops on validation records (version 1 did not; its entries are compared by its rule).
NOT_IN_FINGERPRINT = ("save_steps", "logging_steps", "eval_batch_size", "gradient_checkpointing")
EARLIER_RUN = "finished by the interrupted run"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _settings(job: Job, version: int) -> dict:
    """The training settings that decide the job's weights by `version`'s rule (keys added later
    enter only when they differ from what trained before them, so older libraries keep their
    fingerprints)."""
    settings = {k: v for k, v in job.settings.model_dump().items() if k not in NOT_IN_FINGERPRINT}
    if not settings["early_stopping"]["enabled"] or (version >= 2 and not job.validation):
        del settings["early_stopping"]  # added later: off, it trains as before; v2: nothing to stop on
    if settings["precision"] == "auto" and resolved_precision(job.settings) != "fp32":  # auto on a CPU: as before
        settings["precision"] = f"auto:{resolved_precision(job.settings)}"
    if version >= 2:
        del settings["epochs"], settings["max_steps"]  # the Trainer runs job.steps, which is in
        if settings["method"] != "cola":  # read only by a residual chain's links and a residual branch's export
            cola = settings.pop("cola")
            if job.start is not None and job.branch == "residual":  # trunk ⊕ branch, compressed to this rank
                settings["cola_compress_rank"] = cola["compress_rank"]
        if "early_stopping" in settings:  # it batches the validation loss that picks the checkpoint
            settings["eval_batch_size"] = job.settings.eval_batch_size
    if kinds.ENTRIES[job.kind].own_section:  # trained in fp32 by their section's keys: the task
        settings = {"seed": settings["seed"]}  # adapters' learning rate or steps do not retrain it
    return settings


@dataclass(frozen=True)
class BaseFiles:
    """What identifies the base model on disk: its weights' fingerprint (base_model.fingerprint)
    and digests of its tokenizer files and config.json (None: a hub id, or a GGUF for the config)."""

    weights: str
    tokenizer: str | None = None
    config: str | None = None


def _base_part(cfg: Config, base: BaseFiles, version: int) -> str:
    """The base model as the job trains on it: weights, dtype, tokenizer, quantization (v2: and
    a local model's config.json)."""
    from chainlora.quantization import compute_dtype

    name = cfg.base_model if base.weights.startswith("revision:") else None  # a hub model, revision unknown
    part = [base.weights, cfg.dtype, base.tokenizer, name]
    if cfg.base_quantization:  # null: as before
        part.append(cfg.base_quantization)
        compute = str(compute_dtype(cfg.dtype)).removeprefix("torch.")
        if cfg.base_quantization == "4bit" and cfg.dtype == "auto" and compute != "float32":
            part.append(f"compute:{compute}")  # 4-bit layers multiply in what auto means here (a CPU: as before)
    if version >= 2 and base.config:
        part.append(base.config)
    return _digest(part)


def fingerprint(job: Job, cfg: Config, base: BaseFiles | str, world_size: int = 1, start: dict | None = None,
                version: int = FINGERPRINT_VERSION) -> dict:
    """{"version", "sha256": one digest, "parts": {what: digest}}; the parts say WHY a job must
    retrain. `base`: BaseFiles, or only the weights' fingerprint. `start`: the fingerprint of the
    adapter the job continues (the trunk): a new trunk makes its branches stale. `version`: the
    rule (an older one, to compare an entry an older chainlora wrote)."""
    if version != FINGERPRINT_VERSION and version not in OLDER_VERSIONS:
        raise ValueError(f"fingerprint version {version}: unknown")
    base = BaseFiles(base) if isinstance(base, str) else base
    parts = _rule(job, cfg, base, world_size, start, version)
    return {"version": version, "sha256": _digest([version, job.kind, job.path, parts]), "parts": parts}


def _rule(job: Job, cfg: Config, base: BaseFiles, world_size: int, start: dict | None, version: int) -> dict:
    """The fingerprint's parts by `version`'s rule (each `version >= N` marks what version N changed;
    without one a line is every version's)."""
    parts = {
        "base model": _base_part(cfg, base, version),
        # The processes' count is in: a step then holds world_size x batch_size examples.
        "training settings": _digest([_settings(job, version), job.steps, world_size]),
        "training examples": _digest([[p.text, p.answer] for p in job.train]),
    }
    if version >= 2 and not job.reads_base:  # a selector over its own encoder (MiniLM)
        del parts["base model"]
    if job.validation:  # early stopping: the records that choose the checkpoint decide the adapter
        parts["validation examples"] = _digest([[p.text, p.answer] for p in job.validation])
    if job.kind == "classifier":
        c = cfg.classifier.model_dump()
        parts["classifier settings"] = _digest([c["encoder"], c["epochs"], c["learning_rate"],
                                                job.info.get("tasks")])
    elif job.kind == "encoder":
        e = cfg.encoder.model_dump()
        if not e["swap_content"]:  # added later: off, it trains as before, so it keeps the fingerprint
            del e["swap_content"]
        c = cfg.classifier  # the head starts as a linear probe fitted with classifier.epochs / learning_rate
        parts["encoder settings"] = _digest([e, job.info.get("tasks"), c.epochs, c.learning_rate])
    else:
        if kinds.ENTRIES[job.kind].lora:  # the sft selector trains every weight, no LoRA
            parts["LoRA settings"] = _digest(cfg.to_dict()["lora"])  # use_rslora off: as before
        parts["system prompt"] = _digest(cfg.system_prompt)
    if job.start is not None:
        parts["trunk"] = _digest([job.branch, job.start, (start or {}).get("sha256")])
    return parts


def matches(entry: dict | None, path: str, prints: Callable[[int], dict[str, dict]]) -> bool:
    """The entry was fingerprinted for this very job: compared by the rule of the version that
    wrote it (`prints(version)`: every planned job's fingerprint by that rule)."""
    print_ = (entry or {}).get("fingerprint")
    if not isinstance(print_, dict):
        return False
    version = print_.get("version")
    if version != FINGERPRINT_VERSION and version not in OLDER_VERSIONS:
        return False
    return print_.get("sha256") == prints(version)[path]["sha256"]


@dataclass
class Change:
    """One line of the plan."""

    action: str  # keep | train | retrain | remove
    kind: str  # an entry kind of chainlora.library.kinds
    name: str
    path: str
    reason: str
    job: Job | None = None  # None for a removal
    entry: dict | None = None  # keep: the finished entry; remove: the old one
    source: Path | None = None  # keep: the library holding the finished files
    fingerprint: dict | None = None

    @property
    def label(self) -> str:
        return self.name if self.kind == "task" else f"({self.kind})"


def entries(manifest: dict | None) -> list[tuple[str, dict]]:
    """(kind, entry) for every adapter a manifest lists."""
    if not manifest:
        return []
    found = [("task", e) for e in manifest.get("tasks") or []]
    return found + [(k, manifest[k]) for k in kinds.single_entries() if manifest.get(k)]


def find_entry(manifest: dict | None, job: Job) -> dict | None:
    for kind, entry in entries(manifest):
        if kind == job.kind and entry.get("path") == job.path:
            return entry
    return None


def files_match(root: Path, entry: dict, kind: str) -> bool:
    """The adapter's files are there and hash to what the manifest says."""
    files = store.files_of(kind)
    try:
        return store.intact(store.inside(root, entry["path"]), entry, files)
    except (ChainloraError, KeyError):  # no path, or one that leaves the library
        return False


def _why_retrain(old: dict, path: str, prints: Callable[[int], dict[str, dict]], root: Path, kind: str) -> str:
    print_ = old.get("fingerprint")
    if not isinstance(print_, dict) or print_.get("version") not in (FINGERPRINT_VERSION, *OLDER_VERSIONS):
        return "no fingerprint (trained by an older chainlora)"
    new = prints(print_["version"])[path]  # the parts compared by the rule that wrote the entry
    changed = [k for k, v in new["parts"].items() if print_.get("parts", {}).get(k) != v]
    if changed:
        return "changed: " + ", ".join(changed)
    return "files do not match the manifest (corrupt or edited)" if not files_match(root, old, kind) else "changed"


def forced(force: bool, partial_manifest: dict | None) -> bool:
    """--force now, or an interrupted --force run being continued."""
    return force or bool(partial_manifest and partial_manifest.get("forced"))


def decide(jobs: list[Job], prints: Callable[[int], dict[str, dict]], root: Path, manifest: dict | None,
           partial: Path, partial_manifest: dict | None, force: bool) -> list[Change]:
    """The plan: every job kept or (re)trained, then every adapter of the library to remove.

    `prints(version)`: every job's fingerprint by that version's rule. A finished adapter is
    reused from the interrupted run being continued (`partial_manifest`, None when there is none)
    first, then from the library itself; a kept one carries the current fingerprint. Under
    --force (or when continuing a --force run) nothing of the library is reused. Reading only.
    """
    sources = [(partial, partial_manifest, EARLIER_RUN)] if partial_manifest else []
    if not forced(force, partial_manifest):
        sources.append((root, manifest, "unchanged"))
    force = forced(force, partial_manifest)
    changes = []
    for job in jobs:
        fp = prints(FINGERPRINT_VERSION)[job.path]
        change = None
        for where, m, reason in sources:
            entry = find_entry(m, job)
            if matches(entry, job.path, prints) and files_match(where, entry, job.kind):
                change = Change("keep", job.kind, job.name, job.path, reason, job, entry, where, fp)
                break
        if change is None:
            old = find_entry(manifest, job)
            if old is None:
                action, reason = "train", "new"
            else:
                action, reason = "retrain", "--force" if force else _why_retrain(old, job.path, prints, root, job.kind)
            change = Change(action, job.kind, job.name, job.path, reason, job, fingerprint=fp)
        changes.append(change)
    planned = {job.path for job in jobs}
    for kind, entry in entries(manifest):
        if entry.get("path") not in planned:
            why = "no longer in the config's tasks" if kind == "task" else f"{kind} no longer enabled"
            changes.append(Change("remove", kind, entry.get("name", kind), entry["path"], why, entry=entry))
    return changes


def up_to_date(changes: list[Change], root: Path) -> bool:
    """Nothing to train, nothing to remove: every adapter kept from the library itself, its
    fingerprint written by this version (an older one is rewritten by a run)."""
    return all(c.action == "keep" and c.source == root and c.entry.get("fingerprint") == c.fingerprint
               for c in changes)


def format_plan(root: Path, changes: list[Change]) -> str:
    """The plan as a few aligned lines, a count line first."""
    counts = {a: sum(c.action == a for c in changes) for a in ("keep", "train", "retrain", "remove")}
    head = f"plan for {root}: " + ", ".join(f"{n} {a}" for a, n in counts.items())
    width = max([len(c.label) for c in changes] + [8])
    lines = [f"  {c.action:<8} {c.label:<{width}}  {c.reason}" for c in changes]
    return "\n".join([head, *lines])
