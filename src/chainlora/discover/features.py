"""What a record looks like to the clustering.

A task shows in what is asked *and* in the shape of the answer, so a record is four unit
vectors from the bundled sentence encoder (all-MiniLM-L6-v2), concatenated:

    request    the instruction and its input, as the model sees them
    template   the same with its rare words masked ("What does the word "X" mean?")
    answer     the output
    shape      the output with its rare words masked ("X, X, X")

A word is rare when fewer than `rare_fraction` of the records use it (chainlora.data.content):
the word a template is filled with (the input) is rare, the template's own words are not.
Embedded as they are, the filled-in word dominates a short instruction's vector (k-means on the
request alone reaches an adjusted Rand index of 0.5-0.6 on the demo data, bench/discover.py).

Records sharing a template are pooled into one group (the mean of each block, renormalised),
weighted by its size: averaging over a template's records cancels the filled-in words and
the spread of the answers (positive and negative answers of one sentiment template average
to "a sentiment answer"). Data without templates (every instruction its own) is grouped
record by record and clusters as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from chainlora.data.content import mask_rare
from chainlora.data.records import Record

BLOCKS = ("request", "template", "answer", "shape")
ANSWER = BLOCKS.index("answer")


def sum_by(labels: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
    """Row sums of `x` per label (k x d): one sparse product, not a Python loop, and no copy of x."""
    from scipy.sparse import csr_matrix

    ones = np.ones(len(labels), dtype=x.dtype)
    onehot = csr_matrix((ones, (labels, np.arange(len(labels)))), shape=(k, len(labels)))
    return np.asarray(onehot @ x, dtype=np.float64)


def embed_unique(encoder: Any, texts: Sequence[str], batch_size: int = 64, progress: Any = None) -> tuple:
    """(vectors of the distinct texts, index of each text's vector). Embedded once per distinct
    text, shortest first so a batch pads little; `progress(n)` is told how many were done."""
    distinct = list(dict.fromkeys(texts))
    order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
    chunk = batch_size * 16
    parts = []
    for start in range(0, len(order), chunk):
        ids = order[start:start + chunk]
        parts.append(encoder.embed([distinct[i] for i in ids], batch_size=batch_size).cpu().numpy())
        if progress is not None:
            progress(len(ids))
    vectors = np.empty((len(distinct), parts[0].shape[1]), dtype=np.float32)  # discover() refuses empty data
    vectors[order] = np.concatenate(parts)
    where = {t: i for i, t in enumerate(distinct)}
    return vectors, np.fromiter((where[t] for t in texts), dtype=np.int64, count=len(texts))


@dataclass
class Features:
    """Per block, the distinct texts' vectors and each record's row; the records' groups."""

    blocks: list[tuple[np.ndarray, np.ndarray]]  # (vectors, index per record), in BLOCKS order
    group: np.ndarray  # each record's group (its template)
    templates: list[str]  # each group's masked request

    @property
    def n_groups(self) -> int:
        return len(self.templates)

    def weights(self) -> np.ndarray:
        return np.bincount(self.group, minlength=self.n_groups).astype(np.float64)

    def block(self, b: int) -> np.ndarray:
        """Every record's vector of block b (n x d): a new array each call."""
        vectors, index = self.blocks[b]
        return vectors[index]

    def group_means(self) -> np.ndarray:
        """Each group's block means, renormalised and concatenated (n_groups x 4d)."""
        out = []
        for vectors, index in self.blocks:
            sums = sum_by(self.group, self.n_groups, vectors[index])
            out.append(sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12))
        return np.hstack(out).astype(np.float32)


def texts_of(records: Sequence[Record]) -> tuple[list[str], list[str]]:
    return [r.text for r in records], [r.output for r in records]


def features(records: Sequence[Record], encoder: Any, rare_fraction: float = 0.01,
             show_progress: bool = True) -> Features:
    """The four blocks of every record, and its template group (a progress bar with ETA over
    the distinct texts to embed)."""
    from chainlora.console import bar as progress_bar

    requests, answers = texts_of(records)
    texts = (requests, mask_rare(requests, rare_fraction), answers, mask_rare(answers, rare_fraction))
    total = sum(len(set(t)) for t in texts)
    with progress_bar(total=total, desc="embedding", unit="text", disable=not show_progress) as bar:
        blocks = [embed_unique(encoder, t, progress=bar.update) for t in texts]
    names = list(dict.fromkeys(texts[1]))
    where = {t: i for i, t in enumerate(names)}
    group = np.fromiter((where[t] for t in texts[1]), dtype=np.int64, count=len(records))
    return Features(blocks, group, names)
