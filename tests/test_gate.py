"""The per-task gate (`chain.gate`): records held out of every adapter, each task adapter measured
against the mixed adapter on them, and the engine answering a gated task with the mixed adapter
when routed to it — never when the task is asked for by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import cfg_for, write_data

from chainlora.errors import ChainloraError
from chainlora.eval.evaluate import perplexity_table
from chainlora.inference import label_ranking as router
from chainlora.inference.engine import Engine
from chainlora.inference.scoring import perplexity, pooled, record_nll
from chainlora.library import Library, store
from chainlora.train import config, gate, train_library
from chainlora.train.plan import gate_records, load_data, plan_train

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"
TASKS = ["antonym", "sentiment", "rhyme"]
SMALL = ["chain.branch=warm", "chain.trunk_steps=4", "classifier.enabled=false", "router.training.max_steps=2"]


def test_held_out_records_train_nothing_and_stay_put_when_a_task_is_added():
    cfg = config.load(DEMO, ["chain.gate=true", "chain.gate_per_task=24", "tasks=[antonym, rhyme]",
                             "router.enabled=true"])  # every kind of job, the router too
    data = load_data(cfg)
    held = gate_records(cfg, data)
    assert {t: len(v) for t, v in held.items()} == {"antonym": 24, "rhyme": 24}
    texts = {r.text for v in held.values() for r in v}
    jobs = plan_train(cfg, data).jobs
    assert {j.kind for j in jobs} >= {"trunk", "task", "mixed", "router", "classifier", "encoder"}
    for job in jobs:  # adapters and selectors alike
        assert not texts & {p.text for p in job.train}, job.name
    plain = {j.name: j for j in plan_train(config.load(DEMO, ["tasks=[antonym, rhyme]"]), data).jobs}
    assert len(plain["antonym"].train) == len({j.name: j for j in jobs}["antonym"].train) + 24
    more = config.load(DEMO, ["chain.gate=true", "chain.gate_per_task=24", "tasks=[antonym, rhyme, hypernym]"])
    again = gate_records(more, load_data(more))
    assert again["antonym"] == held["antonym"] and again["rhyme"] == held["rhyme"]
    assert gate_records(config.load(DEMO, ["tasks=[antonym, rhyme]"]), data) == {"antonym": [], "rhyme": []}  # off: nothing held


def test_the_gate_needs_a_mixed_adapter():
    with pytest.raises(ChainloraError, match=r"^x.yaml: chain.gate: compares each task adapter with the mixed"):
        config.from_dict({"chain": {"gate": True}, "mixed": {"enabled": False}}, "x.yaml")


def test_only_a_strictly_better_own_adapter_serves():
    assert gate.decide(4.0, 5.0) == "task"
    assert gate.decide(5.0, 5.0) == "mixed" and gate.decide(6.0, 5.0) == "mixed"


@pytest.fixture(scope="module")
def gated_lib(tiny_model_dir, tmp_path_factory) -> Path:
    data = write_data(tmp_path_factory.mktemp("data"), TASKS)
    cfg = cfg_for(tiny_model_dir, data, TASKS, "chain.gate=true", *SMALL)
    return train_library(cfg, tmp_path_factory.mktemp("gate") / "lib"), cfg


def test_the_library_records_what_it_measured(gated_lib):
    root, cfg = gated_lib
    lib = Library.open(root)
    block = lib.manifest["gate"]
    assert set(block["tasks"]) == set(TASKS) and len(block["fingerprint"]) == 64
    held = gate_records(cfg, load_data(cfg))
    engine = Engine.load(root, device="cpu", gate=False, novelty=False)
    for t, v in block["tasks"].items():
        assert v["n"] == len(held[t]) == 4  # 16 train records a task: a quarter held out
        own = perplexity(*pooled(record_nll(engine, held[t], t)))
        mixed = perplexity(*pooled(record_nll(engine, held[t], "mixed")))
        assert v["own"] == pytest.approx(own, rel=1e-4) and v["mixed"] == pytest.approx(mixed, rel=1e-4)
        assert v["serve"] == gate.decide(v["own"], v["mixed"])
    assert block["gated"] == [t for t in TASKS if block["tasks"][t]["serve"] == "mixed"]


def test_an_unchanged_library_keeps_its_gate(gated_lib, tmp_path, capsys):
    root, cfg = gated_lib
    lib = tmp_path / "lib"
    shutil.copytree(root, lib)
    before = json.loads((lib / "chainlora.json").read_text())["gate"]
    train_library(cfg, lib)
    assert "already trained with this config" in capsys.readouterr().out
    assert json.loads((lib / "chainlora.json").read_text())["gate"] == before


def test_a_gated_task_is_answered_by_the_mixed_adapter_when_routed(gated_lib, tmp_path):
    root, cfg = gated_lib
    lib = tmp_path / "lib"
    shutil.copytree(root, lib)
    manifest = store.read_manifest(lib)
    manifest["gate"]["gated"] = ["rhyme"]  # whatever the tiny model measured: rhyme is gated here
    store.write_manifest(lib, manifest)
    engine = Engine.load(lib, device="cpu", threshold=0.0, novelty=False)
    ranking = lambda best: router.Ranking([best, *[t for t in TASKS if t != best]], [0.9, 0.05, 0.05])  # noqa: E731
    rt = engine._decide(ranking("rhyme"), 3, "score")
    assert (rt.task, rt.adapter, rt.fallback, rt.reason) == ("rhyme", "mixed", False, "gated")
    rt = engine._decide(ranking("antonym"), 3, "score")
    assert (rt.adapter, rt.reason) == ("antonym", None)
    (pinned,) = engine.routes_for(["Give a rhyme for cat."], "rhyme")
    assert pinned.adapter == "rhyme"  # asked for by name: its own adapter
    ungated = Engine.load(lib, device="cpu", threshold=0.0, novelty=False, gate=False)
    assert ungated._decide(ranking("rhyme"), 3, "score").adapter == "rhyme"
    records = load_data(cfg).get("rhyme").test
    routes = [engine._decide(ranking("rhyme"), 3, "score") for _ in records]
    (row,) = perplexity_table(engine, {"rhyme": records}, {"rhyme": routes})
    assert row["chain"] == row["mixed"] and row["routed_right"] == 1.0  # right task, mixed adapter answers

