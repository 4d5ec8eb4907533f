"""Instruction data: read records from files, check them, split them by task.

Reads .jsonl/.ndjson (optionally .gz), .json (an array), .csv and .parquet files, or a
`datasets` hub name. Three record shapes are recognised from the first record:
  chainlora / Alpaca  {"task", "instruction", "input"?, "output"}  (Alpaca without a task
                      field takes a default task)
  Firefly             {"kind", "input", "target"}
and any other shape through an explicit field mapping. Reading is a generator: JSONL, CSV
and Parquet stream in constant memory (a .json array is parsed whole; use JSONL for big data).

Every problem is a ChainloraError naming the file and line (or record / row) and the field.
The train/test split hashes each record's task and prompt with a seed, so it is
deterministic, independent of file order, and needs no second pass.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

from chainlora.data.prompts import user_message
from chainlora.errors import ChainloraError

FIELDS = ("task", "instruction", "input", "output")
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
DEMO_TASKS = (
    "definition", "synonyms", "antonym", "hypernym", "example_sentence",
    "translate_en_fr", "translate_en_es", "sentiment", "pronunciation", "rhyme",
)


@dataclass(frozen=True)
class Record:
    """One instruction example. `meta` keeps a source's extra scalar fields (e.g. template)."""

    task: str
    instruction: str
    output: str
    input: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        """The user's request as the model sees it: instruction plus input."""
        return user_message(self.instruction, self.input)


@dataclass(frozen=True)
class FieldMap:
    """Which source field holds each part of a record (None: the source has no such field)."""

    task: str | None = "task"
    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"


FORMATS = {
    "chainlora": FieldMap(),  # also Alpaca: same names, task optional with a default
    "firefly": FieldMap(task="kind", instruction="input", input=None, output="target"),
}


def field_map(fields: Mapping[str, str] | None) -> FieldMap | None:
    """Build a FieldMap from a user mapping like {"instruction": "question", ...}."""
    if not fields:
        return None
    for key, value in fields.items():
        if key not in FIELDS:
            raise ChainloraError(f"fields: unknown key {key!r} (expected one of {', '.join(FIELDS)})")
        if not isinstance(value, str) or not value:
            raise ChainloraError(f"fields.{key}: must be a source field name (text)")
    base = FieldMap(task=None, input=None)
    return FieldMap(**{**base.__dict__, **dict(fields)})


def check_task_name(name: str, where: str) -> str:
    """Task names become directory names in a library: no separators, no dot-dot, no spaces."""
    if not TASK_NAME.fullmatch(name) or ".." in name:
        raise ChainloraError(
            f"{where}: task name {name!r} is not allowed "
            "(letters, digits, '_', '.', '-'; starts with a letter or digit; at most 64 characters)"
        )
    return name


# --------------------------------------------------------------------------- reading rows


def _open_text(path: Path) -> io.TextIOBase:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _data_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed object) for each non-empty line; a malformed line is one clear error."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ChainloraError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        text = f.read()
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChainloraError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})")
    if not isinstance(data, list):
        raise ChainloraError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, row in enumerate(data, 1):
        yield f"{path}: record {i}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row:
                raise ChainloraError(f"{path}:{reader.line_num}: more values than header columns")
            yield f"{path}:{reader.line_num}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise ChainloraError(f"{path}: cannot read Parquet: {e}")
    n = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}: row {n}", row


def _hub_rows(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets

        stream = datasets.load_dataset(name, split=split, streaming=True)
        for i, row in enumerate(stream, 1):
            yield f"{name}[{split}]: row {i}", row
    except ChainloraError:
        raise
    except Exception as e:  # offline, unknown name, bad split: all one message for the user
        raise ChainloraError(f"{name}: not a data file, and the hub dataset could not be read ({e})")


READERS = {".jsonl": jsonl_rows, ".ndjson": jsonl_rows, ".json": _json_rows,
           ".csv": _csv_rows, ".parquet": _parquet_rows}


def _rows(source: str | Path, split: str) -> Iterator[tuple[str, Any]]:
    path = Path(source).expanduser()
    if not path.exists():
        hub_like = re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(source)) and _data_suffix(path) not in READERS
        if hub_like:
            yield from _hub_rows(source, split)
            return
        raise ChainloraError(f"{source}: data file not found")
    if path.is_dir():
        raise ChainloraError(f"{source}: is a directory, expected a data file")
    reader = READERS.get(_data_suffix(path))
    if reader is None:
        raise ChainloraError(f"{source}: unknown data format (use .jsonl, .json, .csv or .parquet)")
    try:
        yield from reader(path)
    except UnicodeDecodeError as e:
        raise ChainloraError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})")
    except (gzip.BadGzipFile, EOFError) as e:
        raise ChainloraError(f"{source}: corrupt gzip file ({e})")


# --------------------------------------------------------------------------- records


def _text(row: Mapping, col: str, where: str, required: bool) -> str:
    value = row.get(col)
    if value is None:
        if required:
            raise ChainloraError(f"{where}: missing field {col!r}")
        return ""
    if not isinstance(value, str):
        raise ChainloraError(f"{where}: field {col!r} must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise ChainloraError(f"{where}: field {col!r} is empty")
    return value


def _record(row: Any, where: str, fmap: FieldMap, default_task: str | None) -> Record:
    if not isinstance(row, Mapping):
        raise ChainloraError(f"{where}: expected a record object, got {type(row).__name__}")
    if fmap.task is not None and row.get(fmap.task) is not None:
        task = _text(row, fmap.task, where, required=True).strip()
    elif default_task is not None:
        task = default_task
    else:
        name = fmap.task or "task"
        raise ChainloraError(f"{where}: missing field {name!r} (add it, map it, or give a default task)")
    used = {fmap.task, fmap.instruction, fmap.input, fmap.output}
    meta = {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool))}
    return Record(
        task=check_task_name(task, where),
        instruction=_text(row, fmap.instruction, where, required=True),
        output=_text(row, fmap.output, where, required=True),
        input=_text(row, fmap.input, where, required=False) if fmap.input else "",
        meta=meta,
    )


def detect_format(row: Any) -> str:
    """Firefly records have `kind` and `target`; everything else reads as chainlora/Alpaca."""
    if isinstance(row, Mapping) and "kind" in row and "target" in row:
        return "firefly"
    return "chainlora"


def read_records(
    source: str | Path,
    *,
    fields: Mapping[str, str] | None = None,
    task: str | None = None,
    split: str = "train",
) -> Iterator[Record]:
    """Stream the records of a data file (or hub dataset `split`), checking each one.

    fields: explicit mapping {"task"|"instruction"|"input"|"output": source field}.
    task: default task for records without one (e.g. a single-task Alpaca file).
    """
    fmap = field_map(fields)
    if task is not None:
        check_task_name(task, "task")
    n = 0
    for where, row in _rows(source, split):
        if fmap is None:
            fmap = FORMATS[detect_format(row)]
        n += 1
        yield _record(row, where, fmap, task)
    if n == 0:
        raise ChainloraError(f"{source}: empty file (no records)")


def split_of(record: Record, seed: int = 0, test_fraction: float = 0.1) -> str:
    """'train' or 'test' from a hash of (seed, task, prompt): stable across runs and file order."""
    key = f"{seed}\x00{record.task}\x00{record.instruction}\x00{record.input}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "train"


def prompt_digest(record: Record) -> str:
    """16 hex digits of sha256 over (instruction, input): the key of "was this prompt trained
    on" (LIB/seen.json), whatever task label or answer a later file gives it."""
    return hashlib.sha256(f"{record.instruction}\x00{record.input}".encode()).hexdigest()[:16]


def check_min_records(counts: Mapping[str, int], min_records: int, source: str | Path) -> None:
    """Refuse a task too small to train on; names the smallest offender."""
    small = sorted((n, t) for t, n in counts.items() if n < min_records)
    if small:
        n, t = small[0]
        raise ChainloraError(f"{source}: task {t!r} has {n} records, fewer than min_records={min_records}")


@dataclass
class TaskData:
    """One task's examples, split."""

    train: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)


def load_tasks(
    source: str | Path,
    *,
    test_source: str | Path | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    min_records: int = 1,
    **read_kw: Any,
) -> dict[str, TaskData]:
    """Read, check and split records by task, sorted by task name.

    With `test_source` the files are the split; otherwise a seeded hash split of `source`.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ChainloraError(f"test_fraction: must be in [0, 1), got {test_fraction}")
    tasks: dict[str, TaskData] = {}
    for r in read_records(source, **read_kw):
        part = "train" if test_source is not None else split_of(r, seed, test_fraction)
        getattr(tasks.setdefault(r.task, TaskData()), part).append(r)
    if test_source is not None:
        for r in read_records(test_source, **read_kw):
            tasks.setdefault(r.task, TaskData()).test.append(r)
    check_min_records({t: len(d.train) + len(d.test) for t, d in tasks.items()}, min_records, source)
    return dict(sorted(tasks.items()))


def heldout_templates(tasks: dict[str, TaskData]) -> dict[str, set]:
    """Per task, the instruction templates (record meta "template") that occur only in the test
    split: wording a selector never saw in training."""
    return {t: {r.meta.get("template") for r in d.test} - {r.meta.get("template") for r in d.train}
            for t, d in tasks.items()}


def demo_path(split: str) -> Path:
    """The bundled demo data file for `split` ('train' or 'test')."""
    path = Path(str(resources.files("chainlora") / "demo" / f"{split}.jsonl.gz"))
    if not path.is_file():
        raise ChainloraError(f"{path}: bundled demo data missing (reinstall chainlora)")
    return path


def load_demo() -> dict[str, TaskData]:
    """The bundled ten-task demo data, with its fixed train/test split."""
    return load_tasks(demo_path("train"), test_source=demo_path("test"))


def read_instructions(path: str | Path) -> list[str]:
    """Instructions for `route` / `generate --input`: JSONL records (`instruction` + optional
    `input`, or `text`) or plain text, one instruction a line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ChainloraError(f"{path}: input file not found")
    out = []
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if _data_suffix(path) not in (".jsonl", ".ndjson", ".json"):
                    out.append(line.rstrip("\n"))
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChainloraError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})")
                where = f"{path}:{lineno}"
                if not isinstance(row, Mapping):
                    raise ChainloraError(f"{where}: expected a record object, got {type(row).__name__}")
                if "text" in row and "instruction" not in row:
                    out.append(_text(row, "text", where, required=True))
                else:
                    out.append(user_message(_text(row, "instruction", where, required=True),
                                            _text(row, "input", where, required=False)))
    except UnicodeDecodeError as e:
        raise ChainloraError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    if not out:
        raise ChainloraError(f"{path}: empty file (no instructions)")
    return out
