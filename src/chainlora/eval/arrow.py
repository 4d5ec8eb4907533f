"""PEFT's Arrow router as a peer system in the evaluation: is a trained selector worth it?

Arrow (Ostapenko et al. 2024, `peft.create_arrow_model`) routes without training: in every LoRA
layer each task adapter's prototype is the top right-singular vector of its B·A, and every
token's hidden state is sent to the top-k adapters whose prototypes it aligns with best. So it
routes per token and per layer, all experts run for every token, and it cannot abstain — the
routed chain instead picks one adapter per request with a selector it trained. Both are
evaluated on the same task adapters, the same records and the same tokenisation.

PEFT's own implementation is used; this module only loads it over a library (on a fresh copy
of the base model: the engine's copy already carries its adapters) and says why it cannot run
where it cannot (Arrow needs every expert at the same rank and on the same modules).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chainlora.errors import ChainloraError
from chainlora.library.store import read_verified

TOP_K = 3  # Arrow's defaults in PEFT's documentation and paper
TEMPERATURE = 1.0


@dataclass
class Arrow:
    """A base model carrying every task adapter of a library behind PEFT's Arrow router."""

    model: Any  # peft.PeftModel with "arrow_router" active
    top_k: int
    temperature: float
    tasks: list[str]

    def info(self) -> dict:
        return {"top_k": self.top_k, "temperature": self.temperature, "experts": len(self.tasks)}

    def generate(self, engine, texts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers, prompted, tokenised, stopped and decoded exactly as the engine does."""
        from chainlora.inference.engine import Route

        route = Route(None, 1.0, adapter="arrow", selector="arrow")
        return [a.text for a in engine.answer_with(self.model, texts, route, max_new_tokens)]


def _task_configs(lib) -> list[dict]:
    """Each task adapter's adapter_config.json, read from the bytes whose sha256 was checked."""
    configs = []
    for entry in lib.tasks:
        data, _ = read_verified(lib.path(entry), entry, what=f"adapter {entry['name']!r}")
        configs.append(json.loads(data))
    return configs


def unavailable(lib) -> str | None:
    """Why Arrow cannot route over this library's task adapters, or None when it can."""
    if not lib.tasks:
        return "the library has no task adapters"
    configs = _task_configs(lib)
    kinds = {c.get("peft_type") for c in configs}
    if kinds != {"LORA"}:
        return f"Arrow routes plain LoRA adapters only (found {', '.join(sorted(map(str, kinds)))})"
    if any(c.get("use_dora") for c in configs):
        return "Arrow does not route DoRA adapters"
    ranks = {c["name"]: cfg.get("r") for c, cfg in zip(lib.tasks, configs)}
    if len(set(ranks.values())) > 1:
        return "Arrow needs every task adapter at one rank (" + ", ".join(f"{t} r={r}" for t, r in ranks.items()) + ")"
    modules = {tuple(sorted(cfg.get("target_modules") or [])) for cfg in configs}
    if len(modules) > 1:
        return "Arrow needs every task adapter on the same target modules"
    return None


def load(engine, *, top_k: int = TOP_K, temperature: float = TEMPERATURE) -> Arrow:
    """Arrow over `engine`'s task adapters on a fresh copy of its base model (same dtype and
    device), with PEFT's `create_arrow_model`. Raises ChainloraError with `unavailable`'s reason."""
    from peft import ArrowConfig, create_arrow_model

    from chainlora.base_model import load_base

    lib = engine.lib
    reason = unavailable(lib)
    if reason:
        raise ChainloraError(f"{lib.root}: {reason}")
    model = engine.base.model
    base = load_base(lib.manifest["base_model"]["name"], dtype=str(model.dtype).removeprefix("torch."),
                     device=str(model.device))
    k = min(top_k, len(lib.tasks))
    settings = ArrowConfig(top_k=k, router_temperature=temperature, rng_seed=0)  # seeded: reproducible prototypes
    arrow = create_arrow_model(base.model, [str(lib.path(e)) for e in lib.tasks], settings)
    arrow.eval()
    return Arrow(arrow, k, temperature, list(lib.task_names))
