"""PEFT's Arrow router as a system of `chainlora eval` (tiny random libraries, CPU)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from chainlora import library
from chainlora.data.records import Record
from chainlora.eval import arrow, evaluate, tables
from chainlora.inference.engine import Engine
from conftest import make_random_library

TASKS = ["antonym", "sentiment", "rhyme"]


def _records() -> list[Record]:
    words = {"antonym": ["hot", "tall", "early"], "sentiment": ["great film", "awful day", "fine"],
             "rhyme": ["cat", "tree", "moon"]}
    return [Record(task=t, instruction=f"{t} of: {w}", output=f"{w[::-1]} done") for t, ws in words.items() for w in ws]


def _replace_task(lib: Path, task: str, source: Path) -> None:
    """Put the adapter files of `source` at `task` and record their sha256 in the manifest."""
    manifest = json.loads((lib / "chainlora.json").read_text())
    entry = next(e for e in manifest["tasks"] if e["name"] == task)
    for f in library.ADAPTER_FILES:
        shutil.copyfile(source / f, lib / entry["path"] / f)
    entry["sha256"] = library.adapter_sha256(lib / entry["path"])
    library.write_manifest(lib, manifest)


@pytest.fixture(scope="module")
def identical_lib(tiny_model_dir, tmp_path_factory) -> Path:
    """Three task adapters with the same weights: Arrow's mix of them is that one adapter."""
    lib = make_random_library(tmp_path_factory.mktemp("arrow") / "lib", tiny_model_dir, TASKS)
    for task in TASKS[1:]:
        _replace_task(lib, task, lib / library.task_path(TASKS[0]))
    return lib


def test_identical_experts_give_the_own_adapter_perplexity_and_answers(identical_lib):
    engine = Engine.load(identical_lib, device="cpu")
    result = evaluate.evaluate(engine, _records(), max_new_tokens=6, selectors=["score"])
    assert result["arrow"] == {"top_k": 3, "temperature": 1.0, "experts": 3}
    for row in result["perplexity"]:
        assert row["arrow"] == pytest.approx(row["own"], rel=1e-5), row["task"]
        assert not math.isclose(row["arrow"], row["base"], rel_tol=1e-3)  # the adapters do change outputs
    own = [a.text for a in engine.generate([r.text for r in _records()], task=TASKS[0], max_new_tokens=6)]
    assert [a for t in TASKS for a in result["answers"]["arrow"][t]] == own
    assert "arrow" in result["perplexity_mean"] and "arrow" in result["metrics"]["antonym"]
    assert result["chain_beats_arrow"] == sum(r["chain"] < r["arrow"] for r in result["perplexity"])


def test_distinct_experts_are_mixed_per_token(random_lib):
    """Five different adapters: Arrow is none of them alone, and Table I says how the chain fares."""
    engine = Engine.load(random_lib, device="cpu")
    records = [Record(task=t, instruction=f"{t}: example {i}", output=f"answer {i}")
               for t in engine.tasks for i in range(2)]
    result = evaluate.evaluate(engine, records, generate=False, selectors=["score"])
    for row in result["perplexity"]:
        single = [evaluate.perplexity(*evaluate.pooled(evaluate.record_nll(engine, [r for r in records if r.task == row["task"]], t)))
                  for t in engine.tasks]
        assert all(not math.isclose(row["arrow"], s, rel_tol=1e-4) for s in single)
    caption = tables.perplexity(result).caption
    assert f"chain < Arrow on {result['chain_beats_arrow']} of 5 (Arrow top-3)" in caption


def test_mismatched_ranks_skip_arrow_with_the_reason(tiny_model_dir, tmp_path):
    lib = make_random_library(tmp_path / "lib", tiny_model_dir, TASKS)
    other = make_random_library(tmp_path / "r2", tiny_model_dir, TASKS[:1], router=False, mixed=False, r=2)
    _replace_task(lib, "rhyme", other / library.task_path(TASKS[0]))
    reason = arrow.unavailable(library.Library.open(lib))
    assert reason == "Arrow needs every task adapter at one rank (antonym r=4, sentiment r=4, rhyme r=2)"
    engine = Engine.load(lib, device="cpu")
    result = evaluate.evaluate(engine, _records(), generate=False, selectors=["score"])
    assert result["arrow"] == {"skipped": reason}
    assert all("arrow" not in r for r in result["perplexity"]) and "chain_beats_arrow" not in result
    assert "(Arrow skipped: Arrow needs every task adapter at one rank" in tables.perplexity(result).caption


def test_no_arrow_leaves_it_out(random_lib):
    engine = Engine.load(random_lib, device="cpu")
    result = evaluate.evaluate(engine, _records(), generate=False, selectors=["score"], arrow=False)
    assert result["arrow"] == {"skipped": "not asked for (--no-arrow)"}
    assert "arrow" not in result["perplexity_mean"]
