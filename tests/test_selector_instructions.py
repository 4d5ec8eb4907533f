"""selection.instructions: hand-written phrasings that only the selectors and the out-of-library
detector learn from — parsed with clear errors, slots filled with every task's words alike, on
top of the selectors' own records, never in an adapter's examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chainlora.data import DEMO_TASKS
from chainlora.data import selector_instructions as si
from chainlora.data.records import Record
from chainlora.errors import ChainloraError
from chainlora.train import changes, config
from chainlora.train.plan import load_data, plan_train, selector_split
from chainlora.train.selection import bank_records

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _train() -> dict[str, list[Record]]:
    return {"a": [Record("a", f"A {w}?", "x", meta={"word": w}) for w in ("cat", "dog", "sun")],
            "b": [Record("b", f"B {w}?", "x", meta={"word": w}) for w in ("moon", "tree")]}


def test_read_names_the_line_of_every_mistake(tmp_path):
    with pytest.raises(ChainloraError, match=r"x\.jsonl:2: malformed JSON"):
        si.read(_write(tmp_path / "x.jsonl", [{"task": "a", "instruction": "hi"}, "{oops"]))
    with pytest.raises(ChainloraError, match=r"x\.jsonl:1: 'instruction' must be non-empty text"):
        si.read(_write(tmp_path / "x.jsonl", [{"task": "a", "instruction": "  "}]))
    with pytest.raises(ChainloraError, match=r"x\.jsonl:1: expected an object"):
        si.read(_write(tmp_path / "x.jsonl", ["[1, 2]"]))
    with pytest.raises(ChainloraError, match="empty file"):
        si.read(_write(tmp_path / "x.jsonl", [""]))
    with pytest.raises(ChainloraError, match="selection.instructions file not found"):
        si.read(tmp_path / "missing.jsonl")
    rows = si.read(_write(tmp_path / "x.jsonl", [{"task": "a", "instruction": "opposite of {word}?"}, "",
                                                   {"task": "b", "instruction": "Define this.", "input": "{word}"}]))
    assert [(r.task, r.instruction, r.input) for r in rows] == [("a", "opposite of {word}?", ""),
                                                                ("b", "Define this.", "{word}")]
    assert rows[1].where.endswith("x.jsonl:3")


def test_expand_fills_slots_with_every_tasks_words_and_is_seeded():
    rows = [si.Phrasing("f:1", "a", "opposite of {word}?"), si.Phrasing("f:2", "b", "Say it plainly."),
            si.Phrasing("f:3", "b", "Define this.", "{word}")]
    out = si.expand(rows, _train(), per_template=4, seed=0)
    assert len(out["a"]) == 4 and len(out["b"]) == 1 + 4
    assert {r.meta["word"] for r in out["a"]} <= {"cat", "dog", "sun", "moon", "tree"}
    assert all(r.text.startswith("opposite of ") and "{word}" not in r.text for r in out["a"])
    assert out["b"][0].text == "Say it plainly." and out["b"][1].instruction == "Define this."
    assert all(r.output == "" for rs in out.values() for r in rs)  # no answers: selectors only
    assert [r.text for r in si.expand(rows, _train(), 4, 0)["a"]] == [r.text for r in out["a"]]
    assert len(si.expand(rows, _train(), per_template=50, seed=0)["a"]) == 5  # at most every word once
    with pytest.raises(ChainloraError, match=r"^f: no phrasing names a task of this library \(a, b\)"):
        si.expand([si.Phrasing("f:9", "c", "x")], _train(), 4, 0)
    assert si.expand(rows + [si.Phrasing("f:9", "c", "x")], _train(), 4, 0).keys() == {"a", "b"}  # other tasks skipped
    bare = {"a": [Record("a", "no words here", "x")]}
    with pytest.raises(ChainloraError, match=r"f:1: \{word\} needs words"):
        si.expand(rows[:1], bare, 4, 0)


def test_words_fall_back_to_one_word_inputs():
    train = {"a": [Record("a", "Antonym?", "x", "big"), Record("a", "Long input", "x", "two words")]}
    assert si.words_of(train) == ["big"]


def test_bundled_file_covers_every_demo_task():
    rows = si.read("demo")
    assert {r.task for r in rows} == set(DEMO_TASKS)
    assert all(si.SLOT in r.instruction for r in rows)


def test_plan_gives_the_phrasings_to_selectors_only(tmp_path):
    plain_cfg = config.load(DEMO, ["training.max_steps=2", "selection.instructions=null"])
    data = load_data(plain_cfg)
    cfg = config.load(DEMO, ["training.max_steps=2", "selection.instructions=demo",
                             "selection.instructions_per_template=3"])
    plain = {j.name: j for j in plan_train(plain_cfg, data).jobs}
    extra = {j.name: j for j in plan_train(cfg, data).jobs}
    n_extra = 3 * len(si.read("demo"))
    for name in ("encoder", "classifier"):
        assert len(extra[name].train) == len(plain[name].train) + n_extra
        assert [p.text for p in extra[name].train[:5]] == [p.text for p in plain[name].train[:5]]  # own records stay
        fp = changes.fingerprint(extra[name], cfg, "base")
        assert fp["parts"]["training examples"] != changes.fingerprint(plain[name], plain_cfg, "base")["parts"]["training examples"]
    for name, job in extra.items():
        if job.kind in ("task", "trunk", "mixed"):
            assert [p.text for p in job.train] == [p.text for p in plain[name].train]  # adapters untouched
    split = selector_split(cfg, {t: d.train for t, d in data.items()})
    assert split.validation == selector_split(plain_cfg, {t: d.train for t, d in data.items()}).validation
    assert any(str(r.meta["template"]).startswith("extra:") for r in bank_records(split, 0))  # the detector sees them
