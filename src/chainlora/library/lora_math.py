"""LoRA factor math shared by training (COLA's export) and `chainlora export` (compression, GGUF).

Pure functions on tensors; torch is imported inside each, so importing this module is cheap.
"""

from __future__ import annotations

import math
import re
from typing import Any


def _pattern(pattern: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key that ends the module name wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):  # PEFT's own matching (keys may be regexes)
            return value
    return default


def peft_scale(cfg: dict, module: str) -> float:
    """The scaling PEFT applies to module's B A (alpha / r, or alpha / sqrt(r) with rsLoRA), with
    its rank_pattern / alpha_pattern; `module` as saved (a leading base_model.model. is ignored)."""
    short = module.split(".", 2)[-1] if module.startswith("base_model.model.") else module
    r = _pattern(cfg.get("rank_pattern") or {}, short, cfg["r"])
    alpha = _pattern(cfg.get("alpha_pattern") or {}, short, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def truncate(b: Any, a: Any, r: int) -> tuple[Any, Any, float, float]:
    """Best rank-r factors (B', A') of ΔW = B A by SVD, computed on the factors (QR of each, then
    an SVD of a (Σr)×(Σr) core) so ΔW is never formed. Returns B', A' and the squared Frobenius
    norms of the dropped part and of ΔW."""
    import torch

    b64, a64 = b.double(), a.double()
    qb, rb = torch.linalg.qr(b64)
    qa, ra = torch.linalg.qr(a64.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(r, s.shape[0])  # a layer narrower than r has fewer singular values: pad with zeros
    new_b = torch.zeros(b.shape[0], r, dtype=torch.float64)
    new_a = torch.zeros(r, a.shape[1], dtype=torch.float64)
    new_b[:, :k] = (qb @ u[:, :k]) * s[:k]
    new_a[:k] = vh[:k] @ qa.T
    return new_b.to(b.dtype), new_a.to(a.dtype), float((s[k:] ** 2).sum()), float((s ** 2).sum())
