"""An adapter's safetensors file, read for a cold load with as few passes over its bytes as it allows.

safetensors' own `load` copies every tensor; a 120-tensor adapter spent more time there than
reading the file. Here:
- `tensor_views(data)`: the tensors as read-only views into the file's (hashed) bytes, made
  only when one is asked for; the header of a layout seen before is not parsed again.
- `reopen_verified(...)`: for a file the library's memo says was hashed and is unchanged since
  (store.read_verified), the tensors without reading the data at all yet: the adapter pool then
  reads the data section straight into its slot tensors (`FileTensors.read_into`, one `preadv`),
  one pass over the bytes instead of a read and a copy. The file's identity (device, inode,
  size, mtime) is checked again on the open file at that read, so the bytes that land are the
  ones that hashed.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chainlora.errors import ChainloraError

DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8)}
SIZES = dict(DTYPES.values())  # torch dtype name -> bytes
IOV_MAX = 1024  # buffers one preadv takes (Linux's UIO_MAXIOV)


def identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileTensors(Mapping):
    """A safetensors file's tensors as read-only views into its bytes, each made on first use.
    `layout` (the header's bytes) names the file's arrangement: adapters of one shape share it,
    so the pool copies them into a slot by a plan made once (adapter_pool.py). Without `data`
    (reopen_verified) the bytes stay on disk until `read_into` (straight into the slots) or
    until a tensor is asked for (the whole file read then, its identity checked)."""

    def __init__(self, data: bytes | None, layout: bytes, base: int, entries: dict[str, tuple[str, tuple, int, int]],
                 path: Path | None = None, ident: tuple | None = None, nbytes: int | None = None):
        self.data, self.layout, self.base, self.entries = data, layout, base, entries
        self.path, self.ident = path, ident
        self.nbytes = len(data) - base if data is not None else nbytes
        self._sections: dict[str, Any] = {}

    def _open(self) -> Any:
        """The file, opened and checked to be the one that hashed."""
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise ChainloraError(f"{self.path}: adapter is missing or unreadable ({e.strerror})")
        if identity(os.fstat(f.fileno())) != self.ident:
            f.close()
            raise ChainloraError(f"{self.path}: adapter changed since it was checked (reload the library)")
        return f

    def stale(self) -> bool:
        """Whether the file on disk is no longer the one staged (only a file not yet read can be)."""
        if self.data is not None:
            return False
        try:
            return identity(os.stat(self.path)) != self.ident
        except OSError:
            return True

    def read_into(self, buffers: list[memoryview]) -> None:
        """The data section, in the file's order, straight into these writable buffers."""
        if self.data is not None:
            view, at = memoryview(self.data)[self.base:], 0
            for b in buffers:
                b[:] = view[at:at + len(b)]
                at += len(b)
            return
        with self._open() as f:
            at, got = self.base, 0
            for i in range(0, len(buffers), IOV_MAX):
                part = buffers[i:i + IOV_MAX]
                n = os.preadv(f.fileno(), part, at) if hasattr(os, "preadv") else _readinto(f, part, at)
                at, got = at + n, got + n
        if got != self.nbytes:
            raise ChainloraError(f"{self.path}: adapter is shorter than its header says")

    def section(self, name: str) -> Any:
        """The data section as one flat tensor of dtype `name` (a view, made once)."""
        if self.data is None:
            with self._open() as f:
                self.data = f.read()
            if len(self.data) != self.base + self.nbytes:
                raise ChainloraError(f"{self.path}: adapter is shorter than its header says")
        if name not in self._sections:
            import warnings

            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "not writable": only read
                self._sections[name] = torch.frombuffer(self.data, dtype=getattr(torch, name), offset=self.base)
        return self._sections[name]

    def __getitem__(self, key: str) -> Any:
        name, shape, start, end = self.entries[key]
        size = SIZES[name]
        return self.section(name)[start // size:end // size].view(shape)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _readinto(f: Any, buffers: list[memoryview], at: int) -> int:
    f.seek(at)
    return sum(f.readinto(b) for b in buffers)


_LAYOUTS: dict[bytes, tuple[dict, int] | None] = {}  # header bytes -> (entries, data bytes); None: not viewable


def _layout(header: bytes, data_bytes: int) -> tuple[dict, int] | None:
    if header not in _LAYOUTS:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        _LAYOUTS[header] = _parse_layout(header, data_bytes)
    parsed = _LAYOUTS[header]
    return parsed if parsed is not None and parsed[1] == data_bytes else None  # the file its header says


def _parse_layout(header_bytes: bytes, data_bytes: int) -> tuple[dict, int] | None:
    header = json.loads(header_bytes)
    header.pop("__metadata__", None)
    if any(h.get("dtype") not in DTYPES for h in header.values()):
        return None
    entries, at = {}, 0
    for key, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # the file's order
        name, size = DTYPES[h["dtype"]]
        start, end = h["data_offsets"]
        if start % size or data_bytes % size or start != at or math.prod(h["shape"]) * size != end - start:
            return None  # not aligned, not packed end to end, or not its shape's size: safetensors judges it
        entries[key], at = (name, tuple(h["shape"]), start, end), end
    return (entries, data_bytes) if at == data_bytes else None


def tensor_views(data: bytes) -> FileTensors | None:
    """The file's tensors as views (FileTensors), or None for a dtype or alignment it does not
    map: the caller falls back to `safetensors.torch.load`."""
    n = int.from_bytes(data[:8], "little")
    parsed = _layout(data[8:8 + n], len(data) - 8 - n)
    return None if parsed is None else FileTensors(data, data[8:8 + n], 8 + n, parsed[0])


def reopen_verified(directory: Path, files: tuple[str, str], sha256: str | None, memo: dict,
                    parsed: dict) -> tuple[Any, FileTensors] | None:
    """(config, weights not yet read) for an adapter that store.read_verified hashed and parsed
    before (`parsed`: folder -> (config, header)) and whose files still have the identities they
    hashed with (`memo`); None otherwise: the caller reads and hashes it as always. Nothing is
    opened here; `read_into` checks the weights' identity again on the open file."""
    seen, known = memo.get(str(directory)), parsed.get(str(directory))
    if seen is None or known is None or seen[0] != sha256:
        return None
    try:
        ids = tuple(identity(os.stat(directory / name)) for name in files)
    except OSError:
        return None  # read_verified says what is wrong
    if ids != seen[1]:
        return None
    config, header = known
    layout = _layout(header, ids[1][2] - 8 - len(header))
    if layout is None:
        return None
    return copy.copy(config), FileTensors(None, header, 8 + len(header), layout[0], path=directory / files[1],
                                          ident=ids[1], nbytes=ids[1][2] - 8 - len(header))
