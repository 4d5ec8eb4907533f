"""Which records of an evaluation file a library never trained on.

A user who points `chainlora eval` at the file the library was trained from gets, by default,
only the records of its held-out split: the library's own LIB/seen.json (written by `chainlora
train`) lists a digest of every training prompt. A library from before seen.json existed is
checked by re-reading its training data with its recorded config, when that file is still there.
Records of tasks the library does not have are named in one line, never silently dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from chainlora.data.records import Record, prompt_digest
from chainlora.errors import ChainloraError
from chainlora.library.store import SEEN


@dataclass
class Selection:
    """The records to score and what was left out, in words a user reads once."""

    records: list[Record]
    trained: int = 0  # training records found among the library's tasks' records
    kept_trained: bool = False  # --include-train: they are scored anyway
    unknown: Counter = field(default_factory=Counter)  # task -> records the library has no adapter for
    checked: str = SEEN  # how training records were recognised ("" = they could not be)

    def notes(self) -> list[str]:
        out = []
        if self.unknown:
            names = ", ".join(f"{t} ({n})" for t, n in sorted(self.unknown.items()))
            out.append(f"skipped {sum(self.unknown.values())} records of tasks this library does not have: {names}")
        if self.trained and self.kept_trained:
            out.append(f"warning: {self.trained} of the scored records were training records of this library "
                       "(--include-train): these numbers are not held out")
        elif self.trained:
            out.append(f"left out {self.trained} training records of this library (its own train split, "
                       f"from {self.checked}); --include-train scores them too")
        if not self.checked:
            out.append("warning: this library records no training split (no seen.json, its training data "
                       "not found): records it trained on cannot be told apart")
        return out

    def as_dict(self) -> dict:
        return {"training_records_left_out": 0 if self.kept_trained else self.trained,
                "training_records_scored": self.trained if self.kept_trained else 0,
                "unknown_tasks": dict(sorted(self.unknown.items())), "split_from": self.checked or None}


def seen_digests(lib) -> tuple[set[str] | None, str]:
    """The library's training prompts' digests and where they came from; (None, "") if unknown."""
    path = lib.root / SEEN
    if path.is_file():
        try:
            return set(json.loads(path.read_text())["digests"]), SEEN
        except (OSError, ValueError, KeyError, TypeError):
            raise ChainloraError(f"{path}: unreadable (retrain the library, or remove the file and rerun)")
    return _from_config(lib)


def _from_config(lib) -> tuple[set[str] | None, str]:
    """An older library: its recorded config's data, split again as training split it."""
    from chainlora.train import config
    from chainlora.train.plan import load_data

    training = lib.manifest.get("training")
    if not training:
        return None, ""
    try:
        data = load_data(config.from_dict(training, str(lib.root / "chainlora.json")))
    except ChainloraError:  # the data file moved or was deleted: say so, do not guess
        return None, ""
    return {prompt_digest(r) for d in data.values() for r in d.train}, "its recorded config's data"


def held_out(lib, tasks: Sequence[str], records: Sequence[Record], include_train: bool = False) -> Selection:
    """The records of `tasks` to score: training records left out unless `include_train`;
    an error when nothing is left, naming why."""
    known = set(tasks)
    unknown = Counter(r.task for r in records if r.task not in known)
    mine = [r for r in records if r.task in known]
    if not mine:
        raise ChainloraError(f"no records of this library's tasks ({', '.join(tasks)}) in the data"
                             + (f"; it has {', '.join(sorted(unknown))}" if unknown else ""))
    seen, source = seen_digests(lib)
    was_trained = [seen is not None and prompt_digest(r) in seen for r in mine]
    kept = mine if include_train else [r for r, t in zip(mine, was_trained) if not t]
    if not kept:
        raise ChainloraError(f"all {len(mine)} records of this library's tasks were its training records "
                             "(nothing held out to score); give a test file, or --include-train to score them anyway")
    return Selection(kept, sum(was_trained), include_train, unknown, source)
