"""Data loading: formats, field mapping, split, and one-line errors for bad input."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from chainlora.cli import main
from chainlora.data import Record, load_tasks, read_records, split_of
from chainlora.errors import ChainloraError

OURS = [
    {"task": "antonym", "instruction": "Give the antonym.", "input": "hot", "output": "cold"},
    {"task": "antonym", "instruction": "Opposite of 'up'?", "output": "down"},
    {"task": "definition", "instruction": "Define cat.", "input": "", "output": "a feline", "template": 2},
]


def write_jsonl(path: Path, rows: list, opener=open) -> Path:
    with opener(path, "wt") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_reads_our_format_and_keeps_extra_fields(tmp_path):
    records = list(read_records(write_jsonl(tmp_path / "d.jsonl", OURS)))
    assert [r.task for r in records] == ["antonym", "antonym", "definition"]
    assert records[0].input == "hot" and records[1].input == ""
    assert records[0].text == "Give the antonym.\n\nhot"
    assert records[2].meta == {"template": 2}


def test_reads_gzipped_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl.gz", OURS, opener=gzip.open)
    assert len(list(read_records(path))) == 3


def test_reads_firefly(tmp_path):
    rows = [{"kind": "Couplet", "input": "上联：春风", "target": "下联：秋月"}]
    (r,) = read_records(write_jsonl(tmp_path / "f.jsonl", rows))
    assert (r.task, r.instruction, r.input, r.output) == ("Couplet", "上联：春风", "", "下联：秋月")


def test_reads_alpaca_json_with_default_task(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    (r,) = read_records(path, task="chat")
    assert r.task == "chat" and r.output == "hi"


def test_field_mapping_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("category,question,answer\nqa,What is 2+2?,4\nqa,Capital of France?,Paris\n")
    records = list(read_records(path, fields={"task": "category", "instruction": "question",
                                              "output": "answer"}))
    assert [(r.task, r.instruction, r.output) for r in records][1] == ("qa", "Capital of France?", "Paris")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(OURS[:2]), path)
    assert [r.output for r in read_records(path)] == ["cold", "down"]


def test_split_is_deterministic_and_order_free(tmp_path):
    records = [Record("t", f"instruction {i}", "out") for i in range(2000)]
    a = [split_of(r, seed=1, test_fraction=0.2) for r in records]
    b = [split_of(r, seed=1, test_fraction=0.2) for r in reversed(records)][::-1]
    assert a == b
    assert 0.17 < a.count("test") / len(a) < 0.23
    assert a != [split_of(r, seed=2, test_fraction=0.2) for r in records]


def test_load_tasks_with_test_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", OURS)
    test = write_jsonl(tmp_path / "test.jsonl", OURS[:1])
    tasks = load_tasks(train, test_source=test)
    assert list(tasks) == ["antonym", "definition"]
    assert (len(tasks["antonym"].train), len(tasks["antonym"].test)) == (2, 1)


def test_streaming_memory_is_constant(tmp_path):
    """Reading a ~20 MB JSONL record by record must not hold it in memory (a 1 GB file would need 10 GB)."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"task": "t", "instruction": "x" * 200, "output": "y" * 200}) + "\n"
    path.write_text(line * 50_000)
    tracemalloc.start()
    assert Counter(r.task for r in read_records(path)) == {"t": 50_000}
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2_000_000, f"peak {peak} bytes while streaming a {path.stat().st_size} byte file"


# ----------------------------------------------------------------------- bad input: exit 2, one line

BAD = {
    "malformed": ('{"task": "a", "instruction": "x", "output": "y"}\n{"task": "a", "instr\n',
                  r"bad.jsonl:2: malformed JSON"),
    "missing_field": ('{"task": "a", "instruction": "x", "output": "y"}\n{"task": "a", "instruction": "x"}\n',
                      r"bad.jsonl:2: missing field 'output'"),
    "empty": ("", r"bad.jsonl: empty file"),
    "blank_lines_only": ("\n\n", r"bad.jsonl: empty file"),
    "non_text": ('{"task": "a", "instruction": "x", "output": ["y"]}\n',
                 r"bad.jsonl:1: field 'output' must be text, got list"),
    "number": ('{"task": "a", "instruction": 5, "output": "y"}\n',
               r"bad.jsonl:1: field 'instruction' must be text, got int"),
    "empty_output": ('{"task": "a", "instruction": "x", "output": "  "}\n', r"bad.jsonl:1: field 'output' is empty"),
    "no_task": ('{"instruction": "x", "output": "y"}\n', r"bad.jsonl:1: missing field 'task'"),
    "bad_task_name": ('{"task": "../evil", "instruction": "x", "output": "y"}\n',
                      r"bad.jsonl:1: task name '../evil' is not allowed"),
    "not_object": ('["a", "b"]\n', r"bad.jsonl:1: expected a record object, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    text, expected = BAD[case]
    (tmp_path / "bad.jsonl").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "bad.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("chainlora: error: ") and expected in err, err


def test_min_records(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", OURS)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "d.jsonl", "--min-records", "2"]) == 2
    assert "d.jsonl: task 'definition' has 1 records, fewer than min_records=2" in capsys.readouterr().err


@pytest.mark.parametrize("args,expected", [
    (["missing.jsonl"], "missing.jsonl: data file not found"),
    (["d.txt"], "d.txt: unknown data format"),
    (["d.jsonl", "--field", "answer=out"], "fields: unknown key 'answer'"),
    (["d.jsonl", "--field", "nonsense"], "--field 'nonsense': expected NAME=SOURCE_FIELD"),
    (["d.jsonl", "--test-fraction", "1.5"], "test_fraction: must be in [0, 1)"),
])
def test_bad_arguments(args, expected, tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", OURS)
    (tmp_path / "d.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    assert main(["data", *args]) == 2
    assert expected in capsys.readouterr().err


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"task": "a",\n "instruction": }\n]')
    with pytest.raises(ChainloraError, match=r"d.json:3: malformed JSON"):
        list(read_records(path))


def test_csv_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("task,instruction,output\na,x,y\na,x,\n")
    with pytest.raises(ChainloraError, match=r"d.csv:3: field 'output' is empty"):
        list(read_records(path))


def test_console_script_has_no_traceback(tmp_path, cli):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    result = cli("data", str(tmp_path / "bad.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "bad.jsonl:1: malformed JSON" in result.stderr


def test_hub_dataset_name_offline_is_one_line(capsys):
    """An org/name that is not a file is read from the hub; offline, that fails in one line."""
    assert main(["data", "YeungNLP/firefly-train-1.1M"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "YeungNLP/firefly-train-1.1M: not a data file, and the hub dataset could not be read" in err
