"""A short, readable name for each cluster: its most distinctive instruction words.

Class-based TF-IDF (as in BERTopic): a cluster is one document; a word scores by how many of
the cluster's instructions use it, times log(1 + A / f), where f is how often it occurs in
all instructions and A the average words per cluster. Words a template is filled with score
low (few instructions use each); words every cluster uses score low (large f). No external
API: a name is the top two words, e.g. "synonyms_words".
"""

from __future__ import annotations

import collections
import math
import re
from typing import Sequence

from chainlora.data.records import check_task_name

WORD = re.compile(r"[a-z]{3,}")


def _stop_words() -> frozenset:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def distinctive_words(instructions: Sequence[str], labels: Sequence[int], k: int, top: int = 5) -> list[list[str]]:
    """Per cluster, its `top` words by class-based TF-IDF (each instruction counts a word once)."""
    stop = _stop_words()
    per = [collections.Counter() for _ in range(k)]
    for text, c in zip(instructions, labels):
        per[c].update({w for w in WORD.findall(text.lower()) if w not in stop})
    total = collections.Counter()
    for counts in per:
        total.update(counts)
    avg = sum(total.values()) / max(k, 1)
    out = []
    for counts in per:
        n = max(sum(counts.values()), 1)
        score = {w: (c / n) * math.log(1 + avg / total[w]) for w, c in counts.items()}
        out.append(sorted(score, key=lambda w: (-score[w], w))[:top])
    return out


def names(words: list[list[str]]) -> list[str]:
    """Unique task names from each cluster's words: the top two joined by "_" ("task_N" if none)."""
    out: list[str] = []
    for i, ws in enumerate(words):
        base = "_".join(ws[:2]) if len(ws) >= 2 else f"{ws[0]}_task" if ws else f"task_{i + 1}"
        name, n = base[:60], 2
        while name in out:
            name, n = f"{base[:56]}_{n}", n + 1
        out.append(check_task_name(name, "discover"))
    return out
