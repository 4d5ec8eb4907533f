"""Atomic writes: a reader never sees half a file, a crash never leaves one behind.

Everything is written to a temporary sibling on the same filesystem and renamed into place,
which POSIX makes atomic.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from chainlora.errors import ChainloraError


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (temp file + fsync + rename)."""
    with open_binary(path) as f:
        f.write(text.encode("utf-8"))
    return Path(path)


@contextlib.contextmanager
def open_binary(path: str | os.PathLike) -> Iterator[Any]:
    """A binary file that becomes `path` (fsynced, renamed) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a library is read by servers too
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block succeeds.

    With replace=False an existing `path` wins (another process finished first) and the
    temporary copy is discarded; with replace=True the new directory replaces the old one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; others (a server) read libraries
        yield tmp
        for dirpath, dirnames, filenames in os.walk(tmp):  # some writers (safetensors) make 0600
            for name in filenames:
                file = os.path.join(dirpath, name)
                if not os.path.islink(file):
                    runnable = os.stat(file).st_mode & 0o111  # a script stays executable
                    os.chmod(file, (0o777 if runnable else 0o666) & ~mask)
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        if replace and path.exists():
            replace_dir(tmp, path)
        else:
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # someone else made it first
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths in ONE atomic step (Linux renameat2 RENAME_EXCHANGE): a reader sees the
    old or the new tree, never neither. False where the system cannot (then nothing moved)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or filesystem
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make directory `new` take the place of `target` (which may exist), then delete the old one.
    Atomic where the system can exchange two paths; else two renames, microseconds apart, the
    first undone if the second fails. The old tree goes to a fresh unique name before it is
    deleted, so nothing left behind can be mistaken for `new`."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
        _fsync_dir(target.parent)
        return
    trash = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    old = trash / "tree"
    if exchange(new, target):
        os.rename(new, old)  # `new` now holds the old tree
    else:
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
    _fsync_dir(target.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where directories can be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and directory under `root` to disk: before a tree replaces another, so
    a power loss cannot leave the new one empty after the old one is gone."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def link_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file or directory tree as hard links (no bytes copied; chainlora never edits a file
    in place, it replaces it, so the two names cannot diverge); real copies where links fail."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, copy_function=link, symlinks=True)
    else:
        link(str(src), str(dst))


# --------------------------------------------------------------------------- output directories


def check_creatable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be created: a file on the way
    (`data.csv/lib`) or a parent nobody may write in (`/proc/x`). Creates nothing: a probe
    directory is made and removed in the nearest folder that exists."""
    path = Path(os.path.abspath(path))
    ancestor = path if path.exists() else path.parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ChainloraError(f"{flag} {path}: {ancestor} is a file, not a directory; nothing was changed")
    if ancestor == path:
        return
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".chainlora-probe."))
    except OSError as e:
        raise ChainloraError(f"{flag} {path}: cannot create it in {ancestor} ({e.strerror}); nothing was changed")


def check_out_dir(path: str | os.PathLike, marker: str, what: str, flag: str = "--out",
                  own: tuple[str, ...] = ()) -> None:
    """An output directory chainlora may write: missing, empty, or one it wrote before (it holds
    `marker`, or only entries named in `own`: what an interrupted run leaves before its marker).
    Anything else is a user's folder, refused in the same one line by every command."""
    path = Path(path)
    check_creatable(path, flag)
    if path.exists() and not path.is_dir():
        raise ChainloraError(f"{path}: exists and is not a directory; nothing was changed (choose another {flag})")
    if path.is_dir() and not (path / marker).exists() and any(p.name not in own for p in path.iterdir()):
        raise ChainloraError(f"{path}: exists and is not {what} (no {marker}); nothing was changed "
                             f"(choose another {flag})")


def files_sha256(directory: str | os.PathLike, names: list[str]) -> dict[str, str]:
    """sha256 of each named file that exists in `directory` (what a writer records of its own files)."""
    import hashlib

    out = {}
    for name in names:
        file = Path(directory) / name
        if file.is_file():
            out[name] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def check_unchanged(directory: str | os.PathLike, written: dict[str, str], flag: str = "--out") -> None:
    """Refuse to overwrite a file the user changed since chainlora wrote it (`written`: name ->
    sha256 recorded then): rerunning a command never loses someone's edits."""
    now = files_sha256(directory, list(written))
    for name, digest in written.items():
        if name in now and now[name] != digest:
            raise ChainloraError(f"{Path(directory) / name}: changed since chainlora wrote it; nothing was "
                                 f"changed (choose another {flag}, or move the file away)")
