"""The out-of-library detector: does an instruction belong to any task of the library at all?

A selector's softmax always names some task, with high confidence even for a request that
belongs to none (general chat, another language): its probabilities compare the library's tasks
with each other, not with everything else. This detector asks a different question — how close
is the instruction to what the tasks were trained on — by k-nearest-neighbour similarity in a
frozen sentence encoder's space (Sun et al. 2022, "Out-of-distribution detection with deep
nearest neighbors"): the k-th highest cosine similarity between the instruction and the
selectors' training instructions. Below a threshold chosen at train time on held-out in-library
instructions (a set share of them accepted) the request goes to the fallback adapter.

Stored as LIB/selection/novelty/embeddings.safetensors (float16, L2-normalised) +
novelty.json (encoder, k, threshold); recorded in the manifest's `selection.novelty`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from chainlora.errors import ChainloraError
from chainlora.library.store import NOVELTY_FILES as FILES

K = 3  # the k of the k-th nearest neighbour: one odd near-duplicate does not vouch for a request


def similarity(bank: Any, queries: Any, k: int = K) -> Any:
    """[Q] k-th highest cosine similarity of each query to the bank (both L2-normalised)."""
    import torch

    sims = queries.float() @ bank.float().T
    k = min(k, bank.shape[0])
    return torch.topk(sims, k, dim=-1).values[:, -1]


def threshold_for(in_library: Sequence[float], recall: float) -> float:
    """The similarity that accepts at least `recall` of these in-library instructions: the
    highest t with #{s >= t} >= ceil(recall * n)."""
    import math

    xs = sorted(in_library, reverse=True)
    if not xs:
        raise ChainloraError("selection: no validation instructions to set the out-of-library threshold")
    return float(xs[min(len(xs), math.ceil(recall * len(xs))) - 1])


def save(directory: Path, bank: Any, info: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": bank.half().contiguous()}, str(directory / FILES[1]))
    (directory / FILES[0]).write_text(json.dumps(info, indent=2) + "\n")


def load(directory: Path) -> tuple[Any, dict]:
    from safetensors.torch import load_file

    try:
        info = json.loads((directory / FILES[0]).read_text())
        bank = load_file(str(directory / FILES[1]))["embeddings"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ChainloraError(f"{directory}: out-of-library detector is missing or unreadable ({e})")
    return bank, info
