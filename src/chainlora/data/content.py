"""Content words: the rare words a template is filled with, told apart from the template's own.

Instruction data is mostly templates filled with a word or a sentence ("What is the opposite of
"able"?"). A word is *content* when fewer than `rare_fraction` of the texts use it: the filled-in
word is rare, the template's wording is not. Two uses:

- task discovery masks content (chainlora.discover.features): the template is what tells
  tasks apart, and a short instruction's vector is dominated by its filled-in word;
- selector training can swap content between records (`swap_content`, `encoder.swap_content`):
  the words a task's records ask about say little about the task (sentiment records ask about
  emotional words, so a selector may learn "happy" -> sentiment), and swapped words leave only
  the wording to learn from. On the demo data it measured within noise of no swap
  (bench/selector_cv.py, leave one instruction template out), so it is off by default.
"""

from __future__ import annotations

import collections
import random
import re
from typing import Sequence

WORD = re.compile(r"\w+")
MASK = "X"


def _document_frequency(texts: Sequence[str]) -> collections.Counter:
    """How many texts use each lower-cased word."""
    df: collections.Counter = collections.Counter()
    for t in texts:
        df.update({w.lower() for w in WORD.findall(t)})
    return df


def _floor(n: int, rare_fraction: float) -> float:
    """How many texts must use a word for it not to be rare (at least 3, so tiny data keeps its words)."""
    return max(3.0, rare_fraction * n)


def mask_rare(texts: Sequence[str], rare_fraction: float) -> list[str]:
    """Each text with the words fewer than `rare_fraction` of the texts use replaced by X."""
    df, keep = _document_frequency(texts), _floor(len(texts), rare_fraction)
    return [WORD.sub(lambda m: m.group(0) if df[m.group(0).lower()] >= keep else MASK, t) for t in texts]


def swap_content(texts: Sequence[str], share: float, seed: int, rare_fraction: float = 0.01) -> list[str]:
    """`share` of the texts (chosen at random, seeded) with every content word replaced by a content
    word drawn from all the texts; the rest as they are. Same length and order as `texts`."""
    df, keep = _document_frequency(texts), _floor(len(texts), rare_fraction)
    pool = sorted({w for t in texts for w in WORD.findall(t) if df[w.lower()] < keep})
    if not pool or share <= 0:
        return list(texts)
    rng = random.Random(seed)
    return [WORD.sub(lambda m: rng.choice(pool) if df[m.group(0).lower()] < keep else m.group(0), t)
            if rng.random() < share else t for t in texts]
