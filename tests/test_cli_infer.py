"""`chainlora route` / `generate` on a tiny library: output shape, --input files, bad input."""

from __future__ import annotations

import json

import pytest

from chainlora.cli import main


def test_route_json(random_lib, capsys):
    assert main(["route", str(random_lib), "Give the antonym of hot.", "What rhymes with cat?",
                 "--json", "--device", "cpu", "--top-k", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["instruction"] for r in rows] == ["Give the antonym of hot.", "What rhymes with cat?"]
    for r in rows:
        assert len(r["top_k"]) == 2 and r["task"] == r["top_k"][0][0] and r["selector"] == "score"


def test_generate_from_jsonl_input_pinned(random_lib, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"instruction": "Give the antonym.", "input": "hot"}\n\n{"text": "Define cat."}\n')
    assert main(["generate", str(random_lib), "--input", str(inp), "--task", "antonym",
                 "--max-new-tokens", "5", "--json", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["instruction"] for r in rows] == ["Give the antonym.\n\nhot", "Define cat."]
    assert all(r["adapter"] == "antonym" and r["completion_tokens"] <= 5 for r in rows)


def test_generate_text_input_file(random_lib, tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("What rhymes with cat?\nDefine dog.\n")
    assert main(["generate", str(random_lib), "--input", str(inp), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    first, second = out.index("] What rhymes with cat?\n"), out.index("] Define dog.\n")
    assert 0 < first < second and out.startswith("[")


@pytest.mark.parametrize("args,expected", [
    (["generate", "{lib}", "ok", "--task", "telepathy"], "unknown task 'telepathy'"),
    (["generate", "{lib}", "  "], "instruction 1: empty"),
    (["route", "{lib}"], "no instructions: give TEXT arguments or --input FILE"),
    (["route", "{lib}", "x", "--input", "{tmp}/in.txt"], "not both"),
    (["route", "{lib}", "--input", "{tmp}/missing.jsonl"], "missing.jsonl: input file not found"),
    (["route", "{lib}", "--input", "{tmp}/bad.jsonl"], "bad.jsonl:2: malformed JSON"),
    (["route", "{tmp}/nolib", "x"], "nolib: library directory not found"),
    (["route", "{lib}", "x", "--selector", "magic"], "--selector: invalid choice: 'magic'"),
])
def test_bad_input_exit_2(args, expected, random_lib, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("hello\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    argv = [a.format(lib=random_lib, tmp=tmp_path) for a in args] + ["--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
