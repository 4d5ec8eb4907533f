"""The adapter library on disk: a directory of plain PEFT adapters plus a manifest.

    LIB/chainlora.json                       the manifest (below)
    LIB/tasks/<name>/adapter_config.json     one LoRA per task (plain PEFT format)
    LIB/tasks/<name>/adapter_model.safetensors
    LIB/router/...                           the task-selection LoRA
    LIB/mixed/...                            the mixed-task baseline LoRA

The manifest records the base model (name + sha256 of its weights), every adapter's path and
sha256 and training facts, the router's task_prompt and labels, and the training config. Every
adapter is written to a temporary directory and renamed into place, and the manifest is
rewritten atomically after each one, so a killed run never leaves a half-written adapter that
looks finished. Opening a library checks the format, that no path leaves the library, and
(by default) every adapter's hash; a mismatch names the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from chainlora import __version__, atomic
from chainlora.data.records import check_task_name
from chainlora.errors import ChainloraError
from chainlora.library import kinds

FORMAT_VERSION = 1
MANIFEST = "chainlora.json"
SEEN = "seen.json"  # digests of the training split's prompts (what `chainlora eval` leaves out)
ADAPTER_FILES = kinds.ADAPTER_FILES
CLASSIFIER_FILES = kinds.files_of("classifier")  # the classifier selector's head
ENCODER_FILES = kinds.files_of("encoder")  # the fine-tuned encoder selector
SFT_FILES = kinds.files_of("sft")  # the fully fine-tuned selector (a whole model)
NOVELTY_FILES = ("novelty.json", "embeddings.safetensors")  # the out-of-library detector
files_of = kinds.files_of  # the files that make up an entry of a kind (chainlora.library.kinds)


def files_sha256(named: list[tuple[str, bytes]]) -> str:
    """One sha256 over (file name, content) pairs: the digest every manifest entry records."""
    h = hashlib.sha256()
    for name, data in named:
        h.update(f"{name}\n".encode())
        h.update(data)
    return h.hexdigest()


def adapter_sha256(directory: Path, files: tuple[str, ...] = ADAPTER_FILES) -> str:
    """The digest of an adapter's config and weights (what changes its outputs)."""
    named = []
    for name in files:
        path = directory / name
        if not path.is_file():
            raise ChainloraError(f"{path}: missing adapter file")
        named.append((name, path.read_bytes()))
    return files_sha256(named)


RACY_S = 2.0  # seconds a file must be older than its hash for read_verified to remember it


def read_verified(directory: Path, entry: dict, files: tuple[str, ...] = ADAPTER_FILES,
                  what: str = "adapter", memo: dict | None = None) -> list[bytes]:
    """The files' bytes, read once and checked against the manifest entry's sha256: the bytes a
    caller then parses are the bytes that were hashed. One clear error for missing or corrupt.

    `memo` (a dict the caller keeps) skips the hash for files whose identity (device, inode,
    size, modification time in ns, read from the open file) is the one they had when they last
    hashed to this sha256: a cold reload of an unchanged adapter costs its read, not its hash.
    A write to the file changes its time, so it is hashed (and refused) again; a file written
    less than RACY_S before it was hashed is not remembered (file times are coarse: a second
    write in the same tick would keep them, git's "racily clean" case)."""
    named, ids = [], []
    for name in files:
        try:
            with open(directory / name, "rb") as f:
                st = os.fstat(f.fileno())
                named.append((name, f.read()))
        except OSError as e:
            raise ChainloraError(f"{directory / name}: {what} is missing or unreadable ({e.strerror})")
        ids.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    key, seen = str(directory), (entry.get("sha256"), tuple(ids))
    if memo is not None and memo.get(key) == seen and all(len(d) == i[2] for (_, d), i in zip(named, ids)):
        return [data for _, data in named]
    if files_sha256(named) != entry.get("sha256"):
        raise ChainloraError(f"{directory / files[-1]}: {what} is corrupt (sha256 does not match the manifest; "
                             "retrain it or restore the file)")
    if memo is not None and time.time_ns() - max(i[3] for i in ids) > RACY_S * 1e9:
        memo[key] = seen
    return [data for _, data in named]


def intact(directory: Path, entry: dict, files: tuple[str, ...] = ADAPTER_FILES) -> bool:
    """Whether the files are there and hash to what the manifest entry says."""
    try:
        read_verified(directory, entry, files)
        return True
    except ChainloraError:
        return False


def adapter_rank(directory: Path | None) -> int | None:
    """The largest LoRA rank in `directory`'s adapter_config.json (its r, or a rank_pattern's);
    None when there is none or the file cannot be read."""
    try:
        cfg = json.loads((directory / ADAPTER_FILES[0]).read_text()) if directory else None
    except (OSError, ValueError):
        return None
    ranks = [cfg.get("r"), *(cfg.get("rank_pattern") or {}).values()] if isinstance(cfg, dict) else []
    return max((r for r in ranks if isinstance(r, int) and r > 0), default=None)


def task_path(name: str) -> str:
    """Where a task's adapter lives, relative to the library; the name is checked first."""
    return f"tasks/{check_task_name(name, 'task')}"


def inside(root: Path, rel: str) -> Path:
    """`root/rel`, refusing anything that resolves outside `root` (absolute paths, `..`, links)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise ChainloraError(f"{root / MANIFEST}: adapter path {rel!r} must be relative to the library")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ChainloraError(f"{root / MANIFEST}: adapter path {rel!r} leaves the library")
    return path


def save_adapter(peft_model: Any, root: Path, rel: str) -> str:
    """Save the active adapter of `peft_model` as plain PEFT files at root/rel, atomically."""
    target = inside(root, rel)
    with atomic.directory(target, replace=True) as tmp:
        peft_model.save_pretrained(str(tmp))
        sha = adapter_sha256(tmp)
    return sha


def new_manifest(base_name: str, base_fingerprint: str, config: dict, config_sha256: str,
                 system_prompt: str | None = None) -> dict:
    """An empty, unfinished manifest for a run about to start."""
    return {
        "format_version": FORMAT_VERSION,
        "chainlora_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "base_model": {"name": base_name, "fingerprint": base_fingerprint},
        "system_prompt": system_prompt,
        "tasks": [],
        **{k: None for k in kinds.single_entries() if k != "trunk"},  # router, mixed and every selector
        "training": config,
        "config_sha256": config_sha256,
    }


def write_manifest(root: Path, manifest: dict) -> None:
    atomic.write_json(root / MANIFEST, manifest)


def read_manifest(root: Path) -> dict | None:
    """The manifest of `root`, or None when there is none; malformed is an error."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChainloraError(f"{path}: corrupt manifest ({e})")
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ChainloraError(f"{path}: not a chainlora library manifest of format {FORMAT_VERSION}")
    return manifest


class Library:
    """An opened, checked adapter library."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | Path, *, verify: bool = True) -> "Library":
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ChainloraError(f"{root}: is a file, not a library directory (give the folder `chainlora train` "
                                 "wrote, the one holding chainlora.json)")
        if not root.is_dir():
            raise ChainloraError(f"{root}: library directory not found")
        manifest = read_manifest(root)
        if manifest is None:
            raise ChainloraError(f"{root}: not a chainlora library (no {MANIFEST})")
        if not manifest.get("complete"):
            raise ChainloraError(f"{root / MANIFEST}: training did not finish; run `chainlora train` with --resume")
        lib = cls(root, manifest)
        for task in lib.tasks:
            check_task_name(task.get("name", ""), f"{root / MANIFEST}: tasks")
        for entry in lib.entries() + [e for _, e in lib.selector_entries()]:
            inside(root, entry.get("path"))
        if verify:
            lib.verify()
        return lib

    @property
    def tasks(self) -> list[dict]:
        return self.manifest["tasks"]

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    @property
    def router(self) -> dict | None:
        return self.manifest.get("router")

    @property
    def mixed(self) -> dict | None:
        return self.manifest.get("mixed")

    @property
    def trunk(self) -> dict | None:
        """The shared trunk the task adapters branched from (chain.branch warm / residual)."""
        return self.manifest.get("trunk")

    @property
    def classifier(self) -> dict | None:
        return self.manifest.get("classifier")

    @property
    def encoder(self) -> dict | None:
        """The fine-tuned encoder selector (Table III's BERT-SFT)."""
        return self.manifest.get("encoder")

    @property
    def sft(self) -> dict | None:
        """The fully fine-tuned base model selector (Table III's Bloomz-SFT)."""
        return self.manifest.get("sft")

    @property
    def selection(self) -> dict | None:
        """What `chainlora train` measured of the selectors: the winner, the threshold, the
        out-of-library detector (None for libraries trained before it)."""
        return self.manifest.get("selection")

    def selector_entries(self) -> list[tuple[str, dict]]:
        """(kind, entry) of the selectors that are models of their own, not LoRA adapters."""
        return [(k, self.manifest[k]) for k in kinds.model_selectors() if self.manifest.get(k)]

    def entries(self) -> list[dict]:
        """Every LoRA adapter entry: tasks, then trunk, router and mixed when present."""
        return self.tasks + [self.manifest[k] for k in kinds.single_entries()
                             if kinds.ENTRIES[k].lora and self.manifest.get(k)]

    def task(self, name: str) -> dict:
        for t in self.tasks:
            if t["name"] == name:
                return t
        raise ChainloraError(f"{self.root}: no task {name!r} (tasks: {', '.join(self.task_names)})")

    def path(self, entry: dict) -> Path:
        return inside(self.root, entry["path"])

    def verify(self) -> None:
        """Recompute every adapter's sha256 and compare with the manifest."""
        for entry in self.entries():
            read_verified(self.path(entry), entry, ADAPTER_FILES, f"adapter {entry['name']!r}")
        for kind, entry in self.selector_entries():
            read_verified(self.path(entry), entry, files_of(kind), kind)
        novelty = (self.selection or {}).get("novelty")
        if novelty:
            read_verified(self.path(novelty), novelty, NOVELTY_FILES, "out-of-library detector")

    def check_base(self, name: str, fingerprint: str) -> None:
        """Refuse a base model other than the one the adapters were trained on."""
        expected = self.manifest["base_model"]
        if expected["fingerprint"] != fingerprint:
            raise ChainloraError(
                f"{self.root / MANIFEST}: adapters were trained on base model {expected['name']!r} "
                f"({expected['fingerprint'][:23]}...), not on {name!r} ({fingerprint[:23]}...)"
            )

