"""Which adapters are loaded: an LRU over two tiers with byte budgets.

    disk (safetensors in the library)  ->  CPU tier (state dicts)  ->  device tier (in the PeftModel)

All adapters of a library live in ONE PeftModel so a batch can mix them (`adapter_names`).
`acquire(names)` makes every adapter of a batch resident on the device, evicting the least
recently used others (`delete_adapter`) when the device budget would be exceeded; evicted
adapters stay in the CPU tier until it overflows too, so a re-load skips the disk. Pinned
adapters (the router) are never evicted. Each disk read is checked against the manifest's
sha256; a missing or corrupt adapter is refused by name and the others keep working.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from chainlora.errors import ChainloraError
from chainlora.library import ADAPTER_FILES, Library


@dataclass
class CacheStats:
    hits: int = 0  # already on the device
    misses: int = 0  # had to be loaded (from the CPU tier or disk)
    disk_loads: int = 0
    evictions: int = 0  # removed from the device


def state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class AdapterCache:
    """LRU adapter residency for one PeftModel built on `base_model`."""

    def __init__(self, base_model: Any, lib: Library, *, device_bytes: int = 256 << 20,
                 cpu_bytes: int = 1 << 30, pinned: tuple[str, ...] = ("router",)):
        self.base_model, self.lib = base_model, lib
        self.device_bytes, self.cpu_bytes = device_bytes, cpu_bytes
        self.pinned = set(pinned)
        self.model: Any = None  # the PeftModel, created with the first adapter
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, LRU first
        self.cpu: OrderedDict[str, tuple[Any, dict, int]] = OrderedDict()  # name -> (config, state, bytes)
        self.stats = CacheStats()
        self.entries = {e["name"]: e for e in lib.entries()}

    # ------------------------------------------------------------------ tiers

    def _read(self, name: str) -> tuple[Any, dict, int]:
        """Disk -> CPU tier: one read of the weights, hashed and parsed from the same bytes."""
        from peft import PeftConfig
        from safetensors.torch import load as load_safetensors

        entry = self.entries.get(name)
        if entry is None:
            raise ChainloraError(f"{self.lib.root}: no adapter {name!r} (have: {', '.join(self.entries)})")
        directory = self.lib.path(entry)
        try:
            config_bytes = (directory / ADAPTER_FILES[0]).read_bytes()
            weights = (directory / ADAPTER_FILES[1]).read_bytes()
        except OSError as e:
            raise ChainloraError(f"{directory}: adapter {name!r} is missing ({e.strerror})")
        h = hashlib.sha256()
        for fname, data in zip(ADAPTER_FILES, (config_bytes, weights)):
            h.update(f"{fname}\n".encode())
            h.update(data)
        if h.hexdigest() != entry.get("sha256"):
            raise ChainloraError(f"{directory / ADAPTER_FILES[1]}: adapter {name!r} is corrupt "
                                 "(sha256 does not match the manifest); refusing it")
        config = PeftConfig.from_pretrained(str(directory))
        config.inference_mode = True
        state = load_safetensors(weights)
        self.stats.disk_loads += 1
        return config, state, state_bytes(state)

    def _from_cpu(self, name: str) -> tuple[Any, dict, int]:
        if name in self.cpu:
            self.cpu.move_to_end(name)
            return self.cpu[name]
        item = self._read(name)
        self.cpu[name] = item
        while sum(b for _, _, b in self.cpu.values()) > self.cpu_bytes and len(self.cpu) > 1:
            self.cpu.popitem(last=False)
        return item

    def _install(self, name: str, config: Any, state: dict) -> None:
        """CPU tier -> device: add the LoRA modules and copy the weights in (no disk access)."""
        from peft import get_peft_model, set_peft_model_state_dict

        # low_cpu_mem_usage: create the LoRA weights empty (meta) and assign the loaded ones,
        # instead of random-initialising them only to overwrite them.
        if self.model is None:
            self.model = get_peft_model(self.base_model, config, adapter_name=name, low_cpu_mem_usage=True)
        else:
            self.model.add_adapter(name, config, low_cpu_mem_usage=True)
        result = set_peft_model_state_dict(self.model, state, adapter_name=name, low_cpu_mem_usage=True)
        if getattr(result, "unexpected_keys", None):
            raise ChainloraError(f"{self.lib.root}: adapter {name!r} does not fit this base model "
                                 f"(unexpected weights, e.g. {result.unexpected_keys[0]})")
        self.model.eval()

    def _evict_for(self, need: int, keep: set[str]) -> None:
        for name in list(self.resident):
            if sum(self.resident.values()) + need <= self.device_bytes:
                return
            if name in self.pinned or name in keep or len(self.resident) <= 1:
                continue
            self.model.delete_adapter(name)
            del self.resident[name]
            self.stats.evictions += 1

    # ------------------------------------------------------------------ API

    def acquire(self, names: list[str]) -> Any:
        """Make every adapter in `names` resident (LRU-touched); return the PeftModel."""
        keep = set(names)
        for name in dict.fromkeys(names):
            if name in self.resident:
                self.stats.hits += 1
                self.resident.move_to_end(name)
                continue
            self.stats.misses += 1
            config, state, size = self._from_cpu(name)
            self._evict_for(size, keep)
            self._install(name, config, state)
            self.resident[name] = size
        return self.model
