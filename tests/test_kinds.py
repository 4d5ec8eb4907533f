"""The registry of entry and selector kinds (chainlora.library.kinds): adding a selector is one
entry, one selector and the module with its three functions — proved with a toy `keyword`
selector that trains, is stored and hash-checked, measured, chosen and routes like the others."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from chainlora import atomic
from chainlora.errors import ChainloraError
from chainlora.library import kinds, store
from chainlora.train import config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
FILES = ("keyword.json",)


# --------------------------------------------------------------------------- the toy selector


def plan_keyword(cfg, ctx):
    """Trained whenever the router is (a toy needs no config section of its own)."""
    from chainlora.data.examples import Pair
    from chainlora.train.plan import Job

    if not cfg.router.enabled:
        return None
    return Job("keyword", "keyword", "keyword", [Pair(r.text, r.task) for r in ctx.training(None)], [],
               cfg.training, steps=0, info={"name": "keyword", "tasks": ctx.names})


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def train_keyword(job, base, cfg, root, progress=None) -> dict:
    """Word counts per task, saved atomically like every selector."""
    counts = {t: Counter() for t in job.info["tasks"]}
    for p in job.train:
        counts[p.answer].update(_words(p.text))
    with atomic.directory(store.inside(root, job.path), replace=True) as tmp:
        (tmp / FILES[0]).write_text(json.dumps({t: dict(c) for t, c in counts.items()}))
        sha = store.adapter_sha256(tmp, FILES)
    return {**job.info, "path": job.path, "n_train": len(job.train), "n_test": 0, "steps": 0, "tokens": 0,
            "train_loss": 0.0, "seconds": 0.0, "sha256": sha}


def rank_keyword(loaded, texts):
    """Each task's summed log word frequency, softmaxed (`loaded`: inference.selectors.Loaded)."""
    from chainlora.inference.label_ranking import Ranking

    counts = loaded.model("keyword", lambda d: json.loads((d / FILES[0]).read_text()))
    out = []
    for text in texts:
        score = {t: sum(math.log1p(c.get(w, 0)) for w in _words(text)) for t, c in counts.items()}
        z = max(score.values())
        weights = {t: math.exp(s - z) for t, s in score.items()}
        total = sum(weights.values())
        tasks = sorted(weights, key=lambda t: -weights[t])
        out.append(Ranking(tasks, [weights[t] / total for t in tasks]))
    return out


@pytest.fixture
def keyword():
    kinds.register_entry(kinds.EntryKind("keyword", FILES, lora=False, trainer=False, selector=True,
                                         plan="test_kinds:plan_keyword", train="test_kinds:train_keyword"))
    kinds.register_selector(kinds.SelectorKind("keyword", "keyword", "router", "test_kinds:rank_keyword",
                                               preference=5))
    yield
    kinds.unregister("keyword")


# --------------------------------------------------------------------------- the tests


def test_builtin_tables_agree_with_the_store():
    assert kinds.selector_names() == ("score", "generate", "classifier", "encoder", "sft")
    assert store.CLASSIFIER_FILES == kinds.files_of("classifier") and kinds.files_of("mixed") == store.ADAPTER_FILES
    assert kinds.model_selectors() == ["classifier", "sft", "encoder"]
    manifest = {"router": {"x": 1}, "encoder": {"x": 1}}
    assert kinds.available(manifest) == ["score", "generate", "encoder"]
    assert kinds.default_for(manifest) == "encoder"  # preferred over score where nothing was measured
    assert kinds.default_for({**manifest, "selection": {"winner": "generate"}}) == "generate"
    assert kinds.default_for({"sft": {"x": 1}}) == "sft"  # an sft-only library routes with what it has
    assert kinds.default_for({}) is None
    with pytest.raises(ValueError, match="no entry kind"):
        kinds.register_selector(kinds.SelectorKind("ghost", "nowhere", "router", "x:y"))


def test_config_names_come_from_the_registry(keyword):
    cfg = config.load(TINY, ["selection.default=keyword", "selection.selectors=[score, keyword]"])
    assert cfg.selection.default == "keyword"
    kinds.unregister("keyword")
    with pytest.raises(ChainloraError, match=r"selection.default: expected 'auto' or 'score'.*got 'keyword'"):
        config.load(TINY, ["selection.default=keyword"])


def test_a_registered_toy_selector_trains_measures_and_routes(keyword, tiny_model_dir, tmp_path):
    from chainlora.inference import selectors
    from chainlora.inference.engine import Engine
    from chainlora.library.store import Library
    from chainlora.base_model import load_base
    from chainlora.train.run import train_library

    cfg = config.load(TINY, [f"base_model={tiny_model_dir}", "classifier.enabled=false", "mixed.enabled=false",
                             "selection.selectors=[score, keyword]", "selection.default=keyword"])
    root = train_library(cfg, tmp_path / "lib")
    lib = Library.open(root)  # hash-checks the toy's file with every adapter
    entry = lib.manifest["keyword"]
    assert entry["path"] == "keyword" and (root / "keyword" / "keyword.json").is_file()
    assert selectors.available(lib) == ["score", "generate", "keyword"]
    sel = lib.selection
    assert set(sel["selectors"]) == {"score", "keyword"} and sel["winner"] == "keyword"
    assert sel["selectors"]["keyword"]["top1"] > 0.5  # the demo tasks' instructions differ in their words

    engine = Engine(lib, load_base(str(tiny_model_dir), device="cpu"))
    assert engine.selector == "keyword"
    routes = engine.route(["Give the antonym of 'hot'.", "Is this review positive or negative: great fun"])
    assert [r.selector for r in routes] == ["keyword", "keyword"]
    assert all(r.top_k and abs(sum(p for _, p in r.top_k) - 1) < 1e-6 for r in routes)

    again = train_library(cfg, root)  # nothing changed: the toy is kept like any adapter
    assert Library.open(again).manifest["keyword"]["sha256"] == entry["sha256"]
    (root / "keyword" / "keyword.json").write_text("{}")
    with pytest.raises(ChainloraError, match="keyword"):
        Library.open(root)
