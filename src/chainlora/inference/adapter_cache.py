"""Which adapters are loaded: an LRU over two tiers with byte budgets.

    disk (safetensors in the library)  ->  CPU tier (state dicts)  ->  device tier (in the PeftModel)

All adapters of a library live in ONE PeftModel so a batch can mix them (`adapter_names`).
Each resident adapter occupies a slot (a PEFT adapter named `_sN_`). `acquire(names)` makes
every adapter of a batch resident, evicting the least recently used others when the device
budget would be exceeded; a new adapter with the same LoRA shape reuses an evicted slot by
copying its weights in (PEFT hotswap) instead of deleting and re-injecting LoRA modules, which
walks the whole model. Evicted adapters stay in the CPU tier until it overflows too, so a
re-load skips the disk. Pinned
adapters (the router) are never evicted. Each disk read is checked against the manifest's
sha256; a missing or corrupt adapter is refused by name and the others keep working.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chainlora.errors import ChainloraError, NotFound
from chainlora.inference.adapter_file import FileTensors, reopen_verified, tensor_views
from chainlora.library.store import ADAPTER_FILES, Library, read_verified


@dataclass
class CacheStats:
    hits: int = 0  # already on the device
    misses: int = 0  # had to be loaded (from the CPU tier or disk)
    disk_loads: int = 0
    evictions: int = 0  # removed from the device
    hotswaps: int = 0  # loads that reused an evicted adapter's slot (weights copied in place)


def state_bytes(state: Mapping) -> int:
    nbytes = getattr(state, "nbytes", None)
    return nbytes if nbytes is not None else sum(t.numel() * t.element_size() for t in state.values())


class AdapterCache:
    """LRU adapter residency for one PeftModel built on `base_model`."""

    def __init__(self, base_model: Any, lib: Library, *, device_bytes: int = 256 << 20,
                 cpu_bytes: int = 1 << 30, pinned: tuple[str, ...] = ("router",),
                 max_adapters: int | None = None):
        self.base_model, self.lib = base_model, lib
        self.device_bytes, self.cpu_bytes = device_bytes, cpu_bytes
        self.max_adapters = max_adapters  # resident unpinned adapters at most (None: bytes decide)
        self.free: list[str] = []  # slots still in the model that hold no adapter (after a reload)
        self.pinned = set(pinned)
        self.model: Any = None  # the PeftModel, created with the first adapter
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, LRU first
        self.slot_of: dict[str, str] = {}  # resident adapter name -> its PeftModel adapter (slot)
        self.slot_config: dict[str, Any] = {}  # slot -> config of the weights it holds
        self._slots = 0
        self.cpu: OrderedDict[str, tuple[Any, dict, int]] = OrderedDict()  # name -> (config, state, bytes)
        self.stats = CacheStats()
        self.entries = {e["name"]: e for e in lib.entries()}
        self.verified: dict = {}  # files hashed once and unchanged since (store.read_verified's memo)
        self.dirs: dict[str, Any] = {}  # adapter name -> its checked folder (Library.path, once)
        self.parsed: dict[str, tuple] = {}  # folder -> (config, safetensors header) of a verified read

    # ------------------------------------------------------------------ tiers

    def _read(self, name: str) -> tuple[Any, dict, int]:
        """Disk -> CPU tier: one read of the weights, hashed and parsed from the same bytes; an
        adapter hashed before and unchanged since is not read here at all (adapter_file.py)."""
        from peft import PeftConfig
        from safetensors.torch import load as load_safetensors

        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"{self.lib.root}: no adapter {name!r} (have: {', '.join(self.entries)})")
        directory = self.dirs.get(name) or self.dirs.setdefault(name, self.lib.path(entry))
        known = reopen_verified(directory, ADAPTER_FILES, entry.get("sha256"), self.verified, self.parsed)
        if known is not None:  # hashed and parsed before, unchanged since: the pool reads its data into a slot
            self.stats.disk_loads += 1
            return known[0], known[1], known[1].nbytes
        config_bytes, weights = read_verified(directory, entry, ADAPTER_FILES, f"adapter {name!r}", self.verified)
        try:  # the bytes match the manifest, yet a hand-edited manifest can vouch for junk
            # parsed from the hashed bytes as PeftConfig.from_pretrained does from the file
            # (without its hub plumbing, most of a cold load's time)
            attrs = json.loads(config_bytes)
            attrs.pop("runtime_config", None)
            config = PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**attrs))
            state = tensor_views(weights) or load_safetensors(weights)
        except Exception as e:
            raise ChainloraError(f"{directory}: adapter {name!r} does not parse ({e.__class__.__name__}: {e})")
        config.inference_mode = True
        self.stats.disk_loads += 1
        if isinstance(state, FileTensors):
            self.parsed[str(directory)] = (copy.copy(config), state.layout)
        return config, state, state_bytes(state)

    def stage(self, name: str) -> tuple[Any, dict, int]:
        """The adapter's (config, weights, bytes) in the CPU tier, read from disk if need be."""
        if name in self.cpu:
            state = self.cpu[name][1]
            if not (isinstance(state, FileTensors) and state.stale()):
                self.cpu.move_to_end(name)
                return self.cpu[name]
            del self.cpu[name]  # staged but not read, and the file changed since: read (and hash) it again
        item = self._read(name)
        self.cpu[name] = item
        while sum(b for _, _, b in self.cpu.values()) > self.cpu_bytes and len(self.cpu) > 1:
            self.cpu.popitem(last=False)
        return item

    def _install(self, slot: str, config: Any, state: dict) -> None:
        """CPU tier -> device, new slot: add the LoRA modules and copy the weights in."""
        from peft import get_peft_model, set_peft_model_state_dict

        # low_cpu_mem_usage: create the LoRA weights empty (meta) and assign the loaded ones,
        # instead of random-initialising them only to overwrite them.
        if self.model is None:
            self.model = get_peft_model(self.base_model, config, adapter_name=slot, low_cpu_mem_usage=True)
        else:
            self.model.add_adapter(slot, config, low_cpu_mem_usage=True)
        # Clone: with low_cpu_mem_usage PEFT adopts the given tensors as the parameters, and a later
        # hotswap into this slot would then overwrite the CPU tier's copy of this adapter.
        owned = {k: v.clone() for k, v in state.items()}
        result = set_peft_model_state_dict(self.model, owned, adapter_name=slot, low_cpu_mem_usage=True)
        if getattr(result, "unexpected_keys", None):
            raise ChainloraError(f"{self.lib.root}: adapter does not fit this base model "
                                 f"(unexpected weights, e.g. {result.unexpected_keys[0]})")
        self.model.eval()
        self.slot_config[slot] = config

    def _swap_into(self, slot: str, config: Any, state: dict) -> bool:
        """CPU tier -> device, recycled slot: copy the weights into an evicted adapter's modules
        (PEFT hotswap), skipping PEFT's module walks. False when the shapes do not allow it."""
        from peft.utils.hotswap import hotswap_adapter_from_state_dict

        if not _same_shape(self.slot_config[slot], config):
            return False
        keyed = {}
        for key, value in state.items():
            for part in (".lora_A.", ".lora_B."):
                if part + "weight" in key:
                    keyed[key.replace(part + "weight", f"{part}{slot}.weight")] = value
                    break
            else:
                return False  # not plain LoRA A/B weights: take the slow, general path
        try:
            hotswap_adapter_from_state_dict(self.model, keyed, slot, config)
        except (RuntimeError, ValueError):
            return False
        self.slot_config[slot] = config
        self.stats.hotswaps += 1
        return True

    def _evict_for(self, need: int, keep: set[str]) -> list[str]:
        """Evict LRU adapters until `need` bytes fit; return the freed slots (still in the model)."""
        freed = []
        for name in list(self.resident):
            unpinned = sum(1 for n in self.resident if n not in self.pinned)
            if sum(self.resident.values()) + need <= self.device_bytes and (
                    self.max_adapters is None or unpinned < self.max_adapters):
                break
            if name in self.pinned or name in keep or len(self.resident) <= 1:
                continue
            freed.append(self.slot_of.pop(name))
            del self.resident[name]
            self.stats.evictions += 1
        return freed

    def _new_slot(self) -> str:
        self._slots += 1
        return f"_s{self._slots}_"  # no slot name is a substring of another (PEFT matches by substring)

    # ------------------------------------------------------------------ API

    def acquire(self, names: list[str]) -> Any:
        """Make every adapter in `names` resident (LRU-touched); return the PeftModel.

        Rows of a batch name their adapter by `slot(name)`.
        """
        keep = set(names)
        for name in dict.fromkeys(names):
            if name in self.resident:
                self.stats.hits += 1
                self.resident.move_to_end(name)
                continue
            self.stats.misses += 1
            config, state, size = self.stage(name)
            freed = self._evict_for(size, keep) if name not in self.pinned else []
            slot = next((f for f in self.free + freed if self._swap_into(f, config, state)), None)
            if slot in self.free:
                self.free.remove(slot)
            for f in freed:
                if f != slot:
                    self.model.delete_adapter(f)
                    del self.slot_config[f]
            if slot is None:
                slot = self._new_slot()
                self._install(slot, config, state)
            self.slot_of[name] = slot
            self.resident[name] = size
        return self.model

    def refresh(self, lib: Library, drop: set[str]) -> None:
        """Take a rescanned library: adapters in `drop` (changed or removed) leave both tiers;
        their slots stay in the model, free for the next load to reuse."""
        for name in drop:
            self.cpu.pop(name, None)
            if name in self.resident:
                del self.resident[name]
                slot = self.slot_of.pop(name)
                if len(self.slot_config) > 1:  # PEFT keeps at least one adapter in the model
                    self.model.delete_adapter(slot)
                    del self.slot_config[slot]
                else:
                    self.free.append(slot)
        self.lib, self.entries = lib, {e["name"]: e for e in lib.entries()}
        self.dirs.clear()
        self.parsed.clear()

    def slot(self, name: str) -> str:
        """The PeftModel adapter name holding `name` (resident adapters only)."""
        return self.slot_of[name]


def _same_shape(a: Any, b: Any) -> bool:
    """Configs whose LoRA modules are interchangeable: same targets, rank and options."""
    fields = ("r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "bias", "rank_pattern",
              "alpha_pattern", "modules_to_save", "layers_to_transform")
    return (type(a) is type(b) and set(a.target_modules or ()) == set(b.target_modules or ())
            and all(getattr(a, f, None) == getattr(b, f, None) for f in fields))
