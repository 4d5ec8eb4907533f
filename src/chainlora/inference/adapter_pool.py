"""The adapter pool: every resident LoRA in preallocated slot tensors, one batched matmul a layer.

PEFT's mixed-adapter forward loops over the distinct adapters of a batch in every LoRA layer
(a sub-batch each), so a batch over 8 adapters costs 8 small matmul pairs a layer, and a cold
load walks the whole model. Here (vLLM / S-LoRA's unified adapter memory, in plain PyTorch)
each targeted Linear gets

    A: [slots, r_max, in]   B: [slots, out, r_max]   scale: [slots]

with ranks zero-padded to r_max and slot 0 all zeros (rows without an adapter). A forward hook
on the base Linear adds, per row i with slot s_i,  scale[s_i] * B[s_i] @ A[s_i] @ x_i : one
gather and two batched matmuls (the BGMV idea), whatever the number of adapters. The batch's
rows and its largest rank are worked out once a batch (`set_rows`), not in every Linear. A cold load
follows its file layout's plan (`_Plan`, made once per layout: adapters of one shape share it):
the data section is read straight into the slot tensors (one `preadv`, adapter_file.py) when the
file was verified before, or copied from the hashed bytes in one `_foreach_copy_`; anything the
plan does not cover (several dtypes, a new larger rank) goes tensor by tensor. PEFT stays the
training path and the reference the tests compare with.

The pool is the device tier for answering; the CPU tier (AdapterCache.stage) feeds it.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any, Callable, Sequence

from chainlora.errors import ChainloraError
from chainlora.inference.adapter_cache import CacheStats
from chainlora.inference.adapter_file import SIZES

ZERO = 0  # the slot that is never written: rows answered by the bare base model


def unsupported(config: Any) -> str | None:
    """Why the pool cannot hold an adapter of this PEFT config (None: it can)."""
    if getattr(config, "peft_type", None) != "LORA":  # PeftType is a str enum
        return f"peft_type {getattr(config, 'peft_type', None)} (the pool holds LoRA)"
    for name in ("use_dora", "fan_in_fan_out", "modules_to_save", "layers_pattern"):
        if getattr(config, name, None):
            return f"{name} is set"
    if getattr(config, "bias", "none") != "none":
        return f"bias={config.bias!r}"
    return None


class _Target:
    """One targeted Linear: its slot tensors and the hook that applies them."""

    def __init__(self, pool: "AdapterPool", linear: Any, slots: int, rank: int):
        import torch

        w = linear.weight
        self.pool, self.linear = pool, linear
        self.A = torch.zeros(slots, rank, linear.in_features, dtype=w.dtype, device=w.device)
        self.B = torch.zeros(slots, linear.out_features, rank, dtype=w.dtype, device=w.device)
        self.scale = torch.zeros(slots, dtype=w.dtype, device=w.device)
        self.rank = [0] * slots  # the rank written in each slot here (0: nothing)
        self.handle = linear.register_forward_hook(self.hook)

    def grow(self, slots: int, rank: int) -> None:
        """Reallocate for more slots or a larger r_max, keeping what the slots hold."""
        import torch

        A = self.A.new_zeros(slots, rank, self.A.shape[2])
        B = self.B.new_zeros(slots, self.B.shape[1], rank)
        n, r = self.A.shape[0], self.A.shape[1]
        A[:n, :r], B[:n, :, :r] = self.A, self.B
        self.A, self.B = A, B
        self.scale = torch.cat([self.scale, self.scale.new_zeros(slots - n)])
        self.rank += [0] * (slots - n)

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.scale[slot] = 0
        self.rank[slot] = 0

    def hook(self, module: Any, args: tuple, output: Any) -> Any:
        batch = self.pool.batch
        if batch is None:  # routing, scoring, training: the pool is not in play
            return None
        x = args[0].to(self.A.dtype)
        rows, single = batch
        if single is not None:  # every row on one adapter (or none): two plain matmuls
            r = self.rank[single]
            if r == 0:
                return None
            delta = (x @ self.A[single, :r].T) @ self.B[single, :, :r].T * self.scale[single]
            return output + delta.to(output.dtype)
        if self not in self.pool.batch_targets:  # no adapter of the batch targets this Linear
            return None
        r = self.pool.batch_rank  # the batch's largest rank, computed once a batch
        # the gather: [b, r, in], [b, out, r]. index_select, not A[rows]: advanced indexing costs
        # 4-6x as much, at a decode step about what the base Linear's matmul does (bench/pool_gather.py)
        A, B = self.A.index_select(0, rows), self.B.index_select(0, rows)
        if r < A.shape[1]:
            A, B = A[:, :r], B[:, :, :r]
        delta = x.reshape(x.shape[0], -1, x.shape[-1]).bmm(A.transpose(1, 2)).bmm(B.transpose(1, 2))
        delta = delta * self.scale.index_select(0, rows).view(-1, 1, 1)
        return output + delta.view(*x.shape[:-1], -1).to(output.dtype)


class AdapterPool:
    """LRU over `slots` preallocated adapter slots on the base model's targeted Linears."""

    def __init__(self, base_model: Any, stage: Callable[[str], tuple[Any, dict, int]], *,
                 slots: int = 8, rank: int = 8):
        self.model, self.stage = base_model, stage
        self.capacity, self.r_max = max(slots, 1), max(rank, 1)
        self.targets: dict[str, _Target] = {}  # module path -> target
        self.keys: dict[str, tuple[_Target, str, str]] = {}  # file key -> (target, "A"|"B", path)
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, LRU first
        self.free = list(range(1, self.capacity + 1))
        self.stats = CacheStats()
        self.batch: tuple[Any, int | None] | None = None  # (row slots tensor, the one slot or None)
        self.batch_slots: set[int] = set()
        self.batch_rank = 0  # the largest rank any target holds in the batch's slots
        self.batch_targets: set[_Target] = set()  # the targets some adapter of the batch writes
        self.plans: dict[bytes, _Plan | None] = {}  # a file layout (its header) -> how it lands in a slot

    # ------------------------------------------------------------------ loading

    def _target(self, key: str) -> tuple[_Target, str, str]:
        """The slot tensor a file key goes to; resolved once per key."""
        hit = self.keys.get(key)
        if hit is not None:
            return hit
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise ChainloraError(f"adapter weight {key!r} is not a LoRA A/B matrix (the pool holds plain LoRA)")
        path, which = m.group(1), m.group(2)
        if path not in self.targets:
            try:
                linear = self.model.get_submodule(path)
            except AttributeError:
                raise ChainloraError(f"adapter weight {key!r}: the base model has no module {path!r}")
            linear = getattr(linear, "base_layer", linear)  # PEFT-wrapped (the router's LoRA)
            if not hasattr(linear, "in_features") or linear.weight.dim() != 2:
                raise ChainloraError(f"adapter weight {key!r}: {path} is not a Linear layer")
            self.targets[path] = _Target(self, linear, self.capacity + 1, self.r_max)
        self.keys[key] = (self.targets[path], which, path)
        return self.keys[key]

    def _write(self, slot: int, config: Any, state: Any) -> None:
        """Copy one adapter's tensors into `slot` of every target (zeroing what it lacks); by
        its layout's plan when it has one (one batched copy), else tensor by tensor."""
        layout = getattr(state, "layout", None)
        if layout is not None:
            if layout not in self.plans:
                self.plans[layout] = _Plan.make(self, state)
            plan = self.plans[layout]
            if plan is not None and plan.fits(self):
                plan.write(self, slot, config, state)
                return
        placed = {}
        for key, tensor in state.items():
            target, which, path = self._target(key)
            placed.setdefault(path, {})[which] = tensor
        top = max((t["A"].shape[0] for t in placed.values() if "A" in t), default=0)
        if top > self.r_max:
            self.r_max = top
            for t in self.targets.values():
                t.grow(self.capacity + 1, top)
            self._grown()
        for path, t in self.targets.items():
            if path not in placed and t.rank[slot]:  # held by the slot's last adapter only
                t.clear(slot)
        for path, ab in placed.items():
            if set(ab) != {"A", "B"}:
                raise ChainloraError(f"adapter module {path}: has lora_{next(iter(ab))} without its pair")
            target, a, b = self.targets[path], ab["A"], ab["B"]
            r = a.shape[0]
            if a.shape[1] != target.A.shape[2] or b.shape != (target.B.shape[1], r):
                raise ChainloraError(f"adapter module {path}: shapes {tuple(a.shape)}, {tuple(b.shape)} do not "
                                     f"fit this base model's [{target.B.shape[1]}, {target.A.shape[2]}]")
            target.A[slot, :r].copy_(a)
            target.B[slot, :, :r].copy_(b)
            if target.rank[slot] > r:  # the last adapter here had a larger rank: zero its tail
                target.A[slot, r:].zero_()
                target.B[slot, :, r:].zero_()
            target.scale[slot] = _scaling(config, path, r)
            target.rank[slot] = r

    def _grown(self) -> None:
        """The slot tensors were reallocated: plans' destination views are stale."""
        for plan in self.plans.values():
            if plan is not None:
                plan.views.clear()

    def _grow_slots(self) -> None:
        new = self.capacity * 2
        for t in self.targets.values():
            t.grow(new + 1, self.r_max)
        self.free += list(range(self.capacity + 1, new + 1))
        self.capacity = new
        self._grown()

    def acquire(self, names: Sequence[str]) -> list[int]:
        """Make every named adapter resident (LRU-touched), evicting others; their slots."""
        keep = set(names)
        for name in dict.fromkeys(names):
            if name in self.resident:
                self.stats.hits += 1
                self.resident.move_to_end(name)
                continue
            self.stats.misses += 1
            config, state, _ = self.stage(name)
            why = unsupported(config)
            if why:
                raise ChainloraError(f"adapter {name!r}: the adapter pool cannot serve it ({why}); "
                                     "serve with --adapters peft")
            if not self.free:
                victim = next((n for n in self.resident if n not in keep), None)
                if victim is None:  # one batch needs more adapters than there are slots
                    self._grow_slots()
                else:
                    self.free.append(self.resident.pop(victim))
                    self.stats.evictions += 1
            slot = self.free.pop(0)
            try:
                self._write(slot, config, state)
            except ChainloraError:
                for t in self.targets.values():
                    t.clear(slot)
                self.free.insert(0, slot)
                raise
            self.resident[name] = slot
        return [self.resident[n] for n in names]

    def drop(self, names: set[str]) -> None:
        """Forget adapters that changed or left the library (a reload); their slots go free."""
        for name in names & set(self.resident):
            slot = self.resident.pop(name)
            for t in self.targets.values():
                t.clear(slot)
            self.free.append(slot)

    # ------------------------------------------------------------------ a batch

    def set_rows(self, slots: Sequence[int]) -> None:
        """The slot of every row of the batch about to run (ZERO: no adapter)."""
        import torch

        distinct = set(slots)
        device = next(iter(self.targets.values())).A.device if self.targets else "cpu"
        self.batch_slots = distinct
        self.batch_targets = {t for t in self.targets.values() if any(t.rank[s] for s in distinct)}
        self.batch_rank = max((t.rank[s] for t in self.batch_targets for s in distinct), default=0)
        self.batch = (torch.tensor(list(slots), dtype=torch.long, device=device),
                      next(iter(distinct)) if len(distinct) == 1 else None)

    def select_rows(self, keep: Sequence[int]) -> None:
        """Only these rows of the batch (indices into it) go on: a chunked prefill dropped the others."""
        if self.batch is not None:
            self.set_rows(self.batch[0][list(keep)].tolist())

    def clear_rows(self) -> None:
        self.batch, self.batch_slots, self.batch_rank, self.batch_targets = None, set(), 0, set()

    def remove(self) -> None:
        """Take the hooks off the base model (the pool is gone)."""
        for t in self.targets.values():
            t.handle.remove()
        self.targets.clear()
        self.keys.clear()
        self.plans.clear()


class _Plan:
    """How one safetensors layout lands in a slot: its tensors in the file's order, each to its
    target's A or B. With it a cold load is ONE `_foreach_copy_` from the file's data section
    (split, not parsed per tensor) and one batched scale write, instead of a Python copy per
    tensor; adapters of one shape share a layout, so the plan is made once."""

    def __init__(self, parts: list[tuple[_Target, str, tuple]], dtype: str, sizes: list[int]):
        self.parts, self.dtype, self.sizes = parts, dtype, sizes  # parts: (target, "A"|"B", shape)
        self.ranks = {t: shape[0] for t, which, shape in parts if which == "A"}
        self.paths = {t: path for path, t in parts[0][0].pool.targets.items() if t in self.ranks} if parts else {}
        self.views: dict[int, tuple] = {}  # slot -> destinations (see _destinations)
        self.values: dict[tuple, list] = {}  # a config's alpha settings -> the targets' scalings

    @staticmethod
    def make(pool: "AdapterPool", state: Any) -> "_Plan | None":
        """A plan for this file's layout; None when it needs the general path (several dtypes,
        not the slots' dtype, a lone A or B, a shape that does not fit: that path says why)."""
        names = {name for name, _, _, _ in state.entries.values()}
        parts, sizes = [], []
        for key, (name, shape, start, end) in state.entries.items():  # the file's order
            target, which, _ = pool._target(key)
            parts.append((target, which, shape))
            sizes.append((end - start) // SIZES[name])
        if len(names) != 1 or not parts or str(parts[0][0].A.dtype) != f"torch.{next(iter(names))}":
            return None
        pairs: dict[_Target, dict] = {}
        for target, which, shape in parts:
            pairs.setdefault(target, {})[which] = shape
        for target, ab in pairs.items():
            if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or ab["A"][1] != target.A.shape[2] or \
                    tuple(ab["B"]) != (target.B.shape[1], ab["A"][0]):
                return None
        return _Plan(parts, next(iter(names)), sizes)

    def fits(self, pool: "AdapterPool") -> bool:
        return max(self.ranks.values()) <= pool.r_max

    def _destinations(self, slot: int) -> tuple[list, bool, list, list | None]:
        """(A/B destinations in the file's order, whether all are contiguous, scale cells, and
        the destinations as writable byte buffers when the file can be read straight into them)."""
        if slot not in self.views:
            dst = [t.A[slot, :shape[0]] if which == "A" else t.B[slot, :, :shape[1]] for t, which, shape in self.parts]
            flat = all(d.is_contiguous() for d in dst)
            cpu = flat and all(d.device.type == "cpu" for d in dst)
            self.views[slot] = ([d.view(-1) for d in dst] if flat else dst, flat,
                                [t.scale[slot:slot + 1] for t in self.ranks],
                                [memoryview(d.view(-1).numpy()).cast("B") for d in dst] if cpu else None)
        return self.views[slot]

    def _scales(self, config: Any) -> list:
        """Each target's scaling under this config, as one-element tensors (cached per alpha)."""
        import torch

        key = (config.lora_alpha, bool(getattr(config, "use_rslora", False)),
               tuple(sorted((getattr(config, "alpha_pattern", None) or {}).items())))
        if key not in self.values:
            dtype = self.parts[0][0].scale.dtype
            self.values[key] = list(torch.tensor([_scaling(config, self.paths[t], r) for t, r in self.ranks.items()],
                                                 dtype=dtype).split(1))
        return self.values[key]

    def write(self, pool: "AdapterPool", slot: int, config: Any, state: Any) -> None:
        import torch

        dst, flat, scale, buffers = self._destinations(slot)
        if buffers is not None:  # one pass: the file's data section read (or copied) into the slot
            state.read_into(buffers)
        else:
            src = state.section(self.dtype).split(self.sizes)
            if not flat:  # a rank below r_max: B's columns are strided, copy shaped
                src = [s.view(shape) for s, (_, _, shape) in zip(src, self.parts)]
            torch._foreach_copy_(dst, list(src))
        for t in pool.targets.values():
            r = self.ranks.get(t, 0)
            if t.rank[slot] > r:  # the slot's last adapter was larger here (or only it targeted t)
                t.A[slot, r:].zero_()
                t.B[slot, :, r:].zero_()
                if not r:
                    t.scale[slot] = 0
            t.rank[slot] = r
        torch._foreach_copy_(scale, self._scales(config))


def library_rank(lib: Any, default: int = 8) -> int:
    """The largest rank among the library's answer adapters: the pool's slots sized to it hold a
    smaller-rank library's B contiguously (read straight from the file) and compute no padding."""
    from chainlora.library.store import adapter_rank

    entries = lib.tasks + ([lib.mixed] if lib.mixed else [])
    return max((r for e in entries if (r := adapter_rank(lib.path(e)))), default=default)


def _scaling(config: Any, path: str, rank: int) -> float:
    """PEFT's scaling for one module: lora_alpha (or its alpha_pattern match) over r (rsLoRA: sqrt r)."""
    alpha = config.lora_alpha
    for key, value in (getattr(config, "alpha_pattern", None) or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            alpha = value
            break
    return alpha / math.sqrt(rank) if getattr(config, "use_rslora", False) else alpha / rank
