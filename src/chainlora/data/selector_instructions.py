"""Extra instructions that only the selectors learn from (`selection.instructions`).

A task's records often share a handful of instruction templates (the demo has five a task), so
a selector trained on them learns those wordings and little else: a user who asks "antonym for
'brave', please" is further from every training instruction than the test split ever is. A
file of hand-written phrasings per task widens what the selectors (and the out-of-library
detector) see, without touching any adapter: the rows have no answers.

File: JSONL, one `{"task": NAME, "instruction": TEXT}` a line (`input` optional). A `{word}` in
the instruction is a slot: the row becomes `per_template` instructions, each filled with a word
drawn from the training records' words of every task alike (records' `meta.word`, else their
one-word inputs), so the filled word says nothing about the task and the wording must.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from chainlora.data.records import Record
from chainlora.errors import ChainloraError

SLOT = "{word}"


@dataclass(frozen=True)
class Phrasing:
    """One line of the file: where it came from, the task, and the instruction (maybe a slot)."""

    where: str
    task: str
    instruction: str
    input: str = ""


def bundled_path() -> Path:
    """The demo's phrasings (`selection.instructions: demo`)."""
    return Path(str(resources.files("chainlora") / "demo" / "selector_instructions.jsonl"))


def read(path: str | Path) -> list[Phrasing]:
    """Parse the file; every malformed line is an error that names the file and line."""
    path = bundled_path() if str(path) == "demo" else Path(path)
    if not path.is_file():
        raise ChainloraError(f"{path}: selection.instructions file not found")
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ChainloraError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChainloraError(f"{where}: malformed JSON: {e.msg} (column {e.colno})")
        if not isinstance(row, Mapping):
            raise ChainloraError(f"{where}: expected an object with 'task' and 'instruction'")
        for key in ("task", "instruction", "input"):
            value = row.get(key, "")
            if not isinstance(value, str) or (key != "input" and not value.strip()):
                raise ChainloraError(f"{where}: {key!r} must be non-empty text")
        out.append(Phrasing(where, row["task"], row["instruction"], row.get("input", "")))
    if not out:
        raise ChainloraError(f"{path}: empty file (no instructions)")
    return out


def words_of(train: Mapping[str, list[Record]]) -> list[str]:
    """The slot's fillers: every task's record words (`meta.word`, else one-word inputs), sorted."""
    words = {str(r.meta["word"]) for rs in train.values() for r in rs if r.meta.get("word")}
    if not words:
        words = {r.input.strip() for rs in train.values() for r in rs if r.input.strip() and " " not in r.input.strip()}
    return sorted(words)


def expand(phrasings: list[Phrasing], train: Mapping[str, list[Record]], per_template: int,
           seed: int) -> dict[str, list[Record]]:
    """Per task of `train`, the phrasings as records (empty outputs: selectors read text and task).
    Phrasings of other tasks are skipped (one file may serve libraries of different task sets);
    a file with none for any task of `train` is an error: its names are likely misspelt."""
    out: dict[str, list[Record]] = {t: [] for t in train}
    if phrasings and not any(p.task in out for p in phrasings):
        raise ChainloraError(f"{phrasings[0].where.rsplit(':', 1)[0]}: no phrasing names a task of this library "
                             f"({', '.join(sorted(out))})")
    words = words_of(train)
    for i, p in enumerate(phrasings):
        if p.task not in out:
            continue
        if SLOT not in p.instruction and SLOT not in p.input:
            out[p.task].append(Record(p.task, p.instruction, "", p.input, {"template": f"extra:{i}"}))
            continue
        if not words:
            raise ChainloraError(f"{p.where}: {SLOT} needs words to fill it, and no training record has "
                                 "a meta 'word' or a one-word input")
        rng = random.Random(f"{seed}:{i}")
        for w in rng.sample(words, min(per_template, len(words))):
            out[p.task].append(Record(p.task, p.instruction.replace(SLOT, w), "", p.input.replace(SLOT, w),
                                      {"template": f"extra:{i}", "word": w}))
    return out
