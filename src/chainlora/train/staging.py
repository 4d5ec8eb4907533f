"""A library is rebuilt beside itself and swapped in whole: nobody sees a half-built one.

`chainlora train --out LIB` works in LIB's sibling `.LIB.partial/`: adapters it keeps are hard
links to LIB's files (no bytes copied, byte-identical), new and changed ones are trained there.
Only when every adapter is finished does the partial library take LIB's place, in one atomic
exchange where the system has one. Until then LIB is exactly what it was — a failed, killed or
interrupted run (--force included) loses nothing — and the partial directory is what --resume
continues. What else LIB holds (evaluations, reports, logs, a user's notes) moves across; the
adapters of removed tasks move to LIB/removed/.

chainlora only ever replaces a directory that holds a chainlora manifest, or an empty one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from chainlora import atomic
from chainlora.errors import ChainloraError
from chainlora.library import kinds, store
from chainlora.train.changes import Change, entries

WORK = ".work"  # Trainer checkpoints, inside the partial library
REMOVED = "removed"  # where the adapters of removed tasks go


def resolve_root(out: str | Path) -> Path:
    """The library's real, absolute path: `--out .` names the current directory, and a symlink
    to a library means the directory it points to (the link itself stays as it is)."""
    root = Path(os.path.realpath(out))
    if root.parent == root:
        raise ChainloraError(f"{root}: cannot write a library at the filesystem root")
    return root


def partial_dir(root: Path) -> Path:
    """`.<name>.partial` next to `root` (same filesystem, so the final rename is atomic)."""
    return root.with_name(f".{root.name}.partial")


def check_target(root: Path) -> None:
    """Refuse an output that chainlora did not write: it must be missing, empty or a library,
    and replaceable by a rename (not a mount point, holding none)."""
    atomic.check_out_dir(root, store.MANIFEST, "a chainlora library")
    if root.is_dir():
        mounts = [Path(d) for d, _, _ in os.walk(root) if os.path.ismount(d)]
        if mounts:
            raise ChainloraError(f"{mounts[0]}: is a mount point; a library is replaced by a rename when "
                                 "it is rebuilt, so use --out a folder inside the mount")


def check_partial(partial: Path, manifest: dict | None, resume: bool, force: bool) -> bool:
    """Whether an unfinished run in `partial` is continued (True) or started over (False).
    Continued only when asked (--resume), discarded only with --force; a complete partial
    library is a leftover of a swap and is always discarded."""
    if not partial.exists():
        return False
    if manifest is None:
        raise ChainloraError(f"{partial}: not a partial chainlora library; remove it by hand")
    if manifest.get("complete"):
        return False
    if resume:
        return True
    if force:
        return False
    raise ChainloraError(f"{partial}: an unfinished run is here; --resume to continue it, "
                         "--force to start over")


class Build:
    """One run's build of the library at `root`: what is there now (`manifest`), the partial
    library beside it (`partial`, its `earlier` manifest when an interrupted run is continued),
    the manifest being written (`new`). Owns every write: the partial directory, the manifest
    after each adapter, the final swap. Its writing methods run on the main process only."""

    def __init__(self, root: Path, resume: bool, force: bool):
        self.root, self.partial = root, partial_dir(root)
        self.manifest = store.read_manifest(root) if root.is_dir() else None
        found = store.read_manifest(self.partial) if self.partial.is_dir() else None
        self.continuing = check_partial(self.partial, found, resume, force)
        self.earlier = found if self.continuing else None
        self.new: dict = {}

    def start(self, new: dict, plan: list[Change]) -> None:
        """The partial library with the kept adapters linked in, `new` recording them."""
        self.new = new
        for c in plan:
            if c.action == "keep":
                record(new, c.job.kind, c.job.path,  # an older version's fingerprint is upgraded
                       {**c.entry, **c.job.info, "path": c.path, "fingerprint": c.fingerprint})
        prepare(self.partial, new, plan, not self.continuing, self.earlier)

    def add(self, kind: str, path: str, entry: dict) -> None:
        """A finished adapter: recorded and the partial manifest rewritten (a kill loses no more)."""
        record(self.new, kind, path, entry)
        store.write_manifest(self.partial, self.new)

    def refresh(self, digest: str, config: dict, plan: list[Change], seen: list[str]) -> None:
        """Nothing to train: record a config that changed only in keys that decide no adapter
        (labels, logging, ...), atomically; say which it was; drop a leftover partial library."""
        m = self.manifest
        if m.get("config_sha256") == digest:
            print(f"{self.root}: already trained with this config (use --force to retrain)")
        else:
            for c in plan:
                record(m, c.job.kind, c.job.path, {**c.entry, **c.job.info})
            m.update(training=config, config_sha256=digest)
            store.write_manifest(self.root, m)
            print(f"{self.root}: every adapter is up to date; the manifest now records the new config")
        write_seen(self.root, seen)
        if self.partial.exists():
            shutil.rmtree(self.partial)

    def finish(self, order: list[str], plan: list[Change], seen: list[str]) -> list[str]:
        """Mark the partial library complete (tasks in plan order), swap it in, print and return
        where removed adapters went."""
        write_seen(self.partial, seen)
        self.new["tasks"].sort(key=lambda e: order.index(e["path"]))
        self.new["complete"] = True
        self.new.pop("forced", None)
        store.write_manifest(self.partial, self.new)
        notes = finish(self.partial, self.root, plan)
        for note in notes:
            print(note)
        return notes


def record(manifest: dict, kind: str, path: str, entry: dict) -> None:
    """Put an adapter's entry into a manifest: a task into the list, any other kind under its name."""
    if kinds.ENTRIES[kind].listed:
        manifest["tasks"] = [e for e in manifest["tasks"] if e["path"] != path] + [entry]
    else:
        manifest[kind] = entry


def write_seen(root: Path, digests: list[str]) -> None:
    """LIB/seen.json: a digest of every prompt in the training split (whatever adapter or selector
    used it), so `chainlora eval` can leave training records out of a file it is given."""
    atomic.write_json(root / store.SEEN, {"key": "sha256(instruction + NUL + input)[:16]", "digests": digests})


def prepare(partial: Path, manifest: dict, changes: list[Change], restart: bool,
            earlier: dict | None) -> None:
    """Main process: the partial library with every kept adapter linked in and recorded. The
    manifest is written first, so an interrupted preparation is still a partial library."""
    if restart and partial.exists():
        trash = partial.with_name(partial.name + ".discard")
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(partial, trash)
        shutil.rmtree(trash)
    partial.mkdir(parents=True, exist_ok=True)
    store.write_manifest(partial, manifest)
    planned = {c.path for c in changes if c.job is not None}
    for _, entry in entries(earlier if not restart else None):  # adapters of jobs no longer planned
        path = store.inside(partial, entry["path"])
        if entry["path"] not in planned and path.exists():
            shutil.rmtree(path)
    for c in changes:
        if c.action == "keep" and c.source != partial:
            target = store.inside(partial, c.path)
            if target.exists():
                shutil.rmtree(target)
            atomic.link_tree(store.inside(c.source, c.path), target)


def finish(partial: Path, root: Path, changes: list[Change]) -> list[str]:
    """Main process: carry LIB's other files over, then swap the finished library in.
    Returns one line per removed adapter saying where its files went."""
    shutil.rmtree(partial / WORK, ignore_errors=True)
    notes = []
    if root.is_dir():
        for c in changes:
            if c.action == "remove" and store.inside(root, c.path).exists():
                dest = partial / REMOVED / c.path
                if dest.exists():
                    shutil.rmtree(dest)
                atomic.link_tree(store.inside(root, c.path), dest)
                notes.append(f"removed {c.label}: {c.reason} (its files are in {root / REMOVED / c.path})")
        # The new library's own files win; an adapter trained now brings its own logs.
        skip = {store.MANIFEST, WORK} | {c.path for c in changes if c.action == "remove"}
        skip |= {f"logs/{c.name}" for c in changes if c.job is not None
                 and not (c.action == "keep" and c.source == root)}
        carry_over(root, partial, skip)
    atomic.fsync_tree(partial)
    atomic.replace_dir(partial, root)
    return notes


def carry_over(old: Path, new: Path, skip: set[str], rel: str = "") -> None:
    """Link into `new` what `old` holds and `new` does not (`new` wins; `skip`ped paths stay)."""
    for item in sorted(old.iterdir()):
        path = f"{rel}{item.name}"
        if path in skip:
            continue
        target = new / item.name
        walk_in = item.is_dir() and not item.is_symlink()
        if not target.exists() and not target.is_symlink():
            if walk_in and any(s.startswith(path + "/") for s in skip):
                target.mkdir()
                carry_over(item, target, skip, f"{path}/")
            else:
                atomic.link_tree(item, target)
        elif walk_in and target.is_dir() and not target.is_symlink():
            carry_over(item, target, skip, f"{path}/")
