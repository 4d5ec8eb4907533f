"""The out-of-library detector: does an instruction belong to any task of the library at all?

A selector's softmax always names some task, with high confidence even for a request that
belongs to none (general chat, another language): its probabilities compare the library's tasks
with each other, not with everything else. This detector asks a different question — how close
is the instruction to what the tasks were trained on — in a frozen sentence encoder's space:

- `mahalanobis` (the default): the distance to the nearest task's mean of the selectors'
  training instructions, under one covariance shared by the tasks and shrunk towards a multiple
  of the identity (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution
  samples"). A task's instructions share their wording and differ in the word they ask about; the
  shared covariance learns that the filled-in word varies freely, so an unseen wording of a task
  stays near it while a request of another kind does not;
- `knn`: the k-th highest cosine similarity to the training instructions (Sun et al. 2022, "Out-of-
  distribution detection with deep nearest neighbors"), the detector of earlier libraries. Near a
  bank of templates filled with many words, a reworded request of a task can sit as far as a
  request of no task (bench/novelty.py measures both).

The score is a similarity (higher: nearer the library's tasks): for `mahalanobis`, minus the
root-mean-square distance per dimension. Below a threshold chosen at train time on held-out
in-library instructions (a set share of them accepted) the request goes to the fallback adapter.

Stored as LIB/selection/novelty/embeddings.safetensors (the task means and the precision matrix,
float32; or the k-NN bank, float16) + novelty.json (method, encoder, threshold); recorded in the
manifest's `selection.novelty`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from chainlora.errors import ChainloraError
from chainlora.library.store import NOVELTY_FILES as FILES

K = 3  # the k of the k-th nearest neighbour: one odd near-duplicate does not vouch for a request
METHODS = ("mahalanobis", "knn")
SHRINKAGE = 0.5  # weight of the identity in the shared covariance: 2,000 instructions fit a 384 x 384 one poorly


def similarity(bank: Any, queries: Any, k: int = K) -> Any:
    """[Q] k-th highest cosine similarity of each query to the bank (both L2-normalised)."""
    import torch

    sims = queries.float() @ bank.float().T
    k = min(k, bank.shape[0])
    return torch.topk(sims, k, dim=-1).values[:, -1]


def fit_mahalanobis(bank: Any, labels: Sequence[str], shrinkage: float = SHRINKAGE) -> dict:
    """Per-task means of the (L2-normalised) bank and the precision matrix of their shared,
    shrunk covariance: (1 - shrinkage) * S + shrinkage * mean(diag S) * I."""
    import torch

    names = sorted(set(labels))
    y = torch.tensor([names.index(t) for t in labels])
    x = bank.double()
    means = torch.stack([x[y == c].mean(0) for c in range(len(names))])
    centred = x - means[y]
    cov = centred.T @ centred / len(x)
    eye = torch.eye(x.shape[1], dtype=cov.dtype)
    cov = (1 - shrinkage) * cov + (shrinkage * cov.diagonal().mean() + 1e-6) * eye  # 1e-6: never singular
    return {"means": means.float(), "precision": torch.linalg.inv(cov).float()}


def mahalanobis(state: dict, queries: Any) -> Any:
    """[Q] minus the RMS-per-dimension Mahalanobis distance of each query to its nearest task mean."""
    x, means, precision = queries.float(), state["means"], state["precision"]
    xp = x @ precision  # (x - m) P (x - m)' expanded: no Q x tasks x dim tensor
    squared = ((xp * x).sum(-1, keepdim=True) - 2 * xp @ means.T + ((means @ precision) * means).sum(-1)).min(1).values
    return -(squared.clamp(min=0) / x.shape[1]).sqrt()


def score(state: dict, info: dict, queries: Any) -> Any:
    """[Q] the detector's similarity of each query, by the method it was fitted with."""
    if info.get("method", "knn") == "mahalanobis":
        return mahalanobis(state, queries)
    return similarity(state["embeddings"], queries, info.get("k", K))


def threshold_for(in_library: Sequence[float], recall: float) -> float:
    """The similarity that accepts at least `recall` of these in-library instructions: the
    highest t with #{s >= t} >= ceil(recall * n)."""
    import math

    xs = sorted(in_library, reverse=True)
    if not xs:
        raise ChainloraError("selection: no validation instructions to set the out-of-library threshold")
    return float(xs[min(len(xs), math.ceil(recall * len(xs))) - 1])


def save(directory: Path, state: dict, info: dict) -> None:
    """`state`: fit_mahalanobis's tensors, or {"embeddings": bank} for k-NN (float16)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if k == "embeddings" else v.float()).contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / FILES[1]))
    (directory / FILES[0]).write_text(json.dumps(info, indent=2) + "\n")


def load(directory: Path) -> tuple[dict, dict]:
    """(tensors, info) of a saved detector; weights by safetensors only."""
    from safetensors.torch import load_file

    try:
        info = json.loads((directory / FILES[0]).read_text())
        state = load_file(str(directory / FILES[1]))
    except (OSError, json.JSONDecodeError) as e:
        raise ChainloraError(f"{directory}: out-of-library detector is missing or unreadable ({e})")
    need = ("means", "precision") if info.get("method", "knn") == "mahalanobis" else ("embeddings",)
    if any(k not in state for k in need):
        raise ChainloraError(f"{directory}: out-of-library detector lacks its {' and '.join(need)}")
    return state, info
