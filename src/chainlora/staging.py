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

from chainlora import atomic, library
from chainlora.changes import Change, entries
from chainlora.errors import ChainloraError

WORK = ".work"  # Trainer checkpoints, inside the partial library
REMOVED = "removed"  # where the adapters of removed tasks go


def partial_dir(root: Path) -> Path:
    """`.<name>.partial` next to `root` (same filesystem, so the final rename is atomic)."""
    root = Path(os.path.abspath(root))
    if root.parent == root:
        raise ChainloraError(f"{root}: cannot write a library at the filesystem root")
    return root.with_name(f".{root.name}.partial")


def check_target(root: Path) -> None:
    """Refuse an output that chainlora did not write: it must be missing, empty or a library."""
    if root.exists() and not root.is_dir():
        raise ChainloraError(f"{root}: exists and is not a directory; nothing was changed (choose another --out)")
    if root.is_dir() and not (root / library.MANIFEST).exists() and any(root.iterdir()):
        raise ChainloraError(f"{root}: exists and is not a chainlora library (no {library.MANIFEST}); "
                             "nothing was changed (choose another --out)")


def check_partial(partial: Path, manifest: dict | None, resume: bool, force: bool) -> None:
    """An unfinished run is continued only when asked (--resume) and discarded only with --force."""
    if not partial.exists() or force:
        if force and partial.exists() and not (partial / library.MANIFEST).exists():
            raise ChainloraError(f"{partial}: not a partial chainlora library; remove it by hand")
        return
    if manifest is None:
        raise ChainloraError(f"{partial}: not a partial chainlora library; remove it by hand")
    if not manifest.get("complete") and not resume:
        raise ChainloraError(f"{partial}: an unfinished run is here; --resume to continue it, "
                             "--force to start over")


def prepare(partial: Path, manifest: dict, changes: list[Change], force: bool) -> None:
    """Main process: the partial library with every kept adapter linked in and recorded."""
    if force and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for c in changes:
        if c.action == "keep" and c.source != partial:
            target = library.inside(partial, c.path)
            if target.exists():
                shutil.rmtree(target)
            atomic.link_tree(library.inside(c.source, c.path), target)
    library.write_manifest(partial, manifest)


def finish(partial: Path, root: Path, old_manifest: dict | None, changes: list[Change],
           trained: list[str]) -> list[str]:
    """Main process: carry LIB's other files over, then swap the finished library in.
    Returns one line per removed adapter saying where its files went."""
    shutil.rmtree(partial / WORK, ignore_errors=True)
    notes = []
    if root.is_dir():
        for c in changes:
            if c.action == "remove" and library.inside(root, c.path).exists():
                dest = partial / REMOVED / c.path
                if dest.exists():
                    shutil.rmtree(dest)
                atomic.link_tree(library.inside(root, c.path), dest)
                notes.append(f"removed {c.label}: {c.reason} (its files are in {root / REMOVED / c.path})")
        skip = {library.MANIFEST, WORK} | {e["path"] for _, e in entries(old_manifest)}
        skip |= {f"logs/{name}" for name in trained}
        carry_over(root, partial, skip)
    atomic.replace_dir(partial, root)
    return notes


def carry_over(old: Path, new: Path, skip: set[str], rel: str = "") -> None:
    """Link into `new` what `old` holds and `new` does not (`new` wins; `skip`ped paths stay)."""
    for item in sorted(old.iterdir()):
        path = f"{rel}{item.name}"
        if path in skip:
            continue
        target = new / item.name
        if not target.exists() and not target.is_symlink():
            atomic.link_tree(item, target)
        elif item.is_dir() and not item.is_symlink() and target.is_dir():
            carry_over(item, target, skip, f"{path}/")
