"""The demo's growth step (demo/growth.py) on the tiny model, and the paired chain-vs-mixed line
the demo prints under Table I (eval/tables.py)."""

from __future__ import annotations

import io
import math

import pytest
from conftest import TASKS, cfg_for, files, write_data
from rich.console import Console

from chainlora.demo import growth
from chainlora.eval import tables
from chainlora.eval.report import growth_table
from chainlora.library import Library


def test_first_stage_drops_the_grown_task_and_the_mixed_baseline_only(tiny_model_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, write_data(tmp_path, TASKS), "all")
    first = growth.first_stage(cfg, TASKS).to_dict()
    whole = cfg.to_dict()
    assert first["tasks"] == [t for t in TASKS if t != growth.GROWN] and first["mixed"]["enabled"] is False
    for key in set(whole) - {"tasks", "mixed"}:  # same training, lora, chain, selectors: the adapters are kept
        assert first[key] == whole[key], key
    assert {k: v for k, v in first["mixed"].items() if k != "enabled"} == \
        {k: v for k, v in whole["mixed"].items() if k != "enabled"}


@pytest.fixture(scope="module")
def grown(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("growth")
    cfg = cfg_for(tiny_model_dir, write_data(d, TASKS), TASKS, "chain.branch=warm", "chain.trunk_fraction=0.5")
    first = d / "first"  # the nine-task stage alone, to compare the grown library's old adapters with
    from chainlora.train import train_library

    train_library(growth.first_stage(cfg, TASKS), first)
    out = d / "lib"
    return cfg, out, growth.train(cfg, out, TASKS, Console(file=io.StringIO())), first


def test_growth_adds_the_task_and_keeps_every_old_adapter_byte_identical(grown):
    cfg, out, g, first = grown
    lib = Library.open(out)
    assert set(lib.task_names) == set(TASKS) and lib.mixed and lib.trunk
    # the trunk and the old task adapters: the same bytes as a library never grown (selectors relearn)
    old = {k: v for k, v in files(first).items() if k.split("/")[0] in ("tasks", "trunk")}
    assert len(old) == len(TASKS) and all(files(out)[k] == v for k, v in old.items())
    assert g["task"] == growth.GROWN and g["kept"] == g["of"] == len(TASKS)  # trunk + the old tasks
    assert g["new_steps"] == lib.task(growth.GROWN)["steps"] > 0
    assert g["selectors"] == ["classifier", "router"] and g["selector_seconds"] >= 0
    # the mixed adapter from its start: the trunk it continues plus its own steps
    assert g["mixed_steps"] == lib.trunk["steps"] + lib.mixed["steps"] > g["new_steps"]
    assert g["tasks_before"] == len(TASKS) - 1 and g["new_examples"] == g["new_steps"] * cfg.training.batch_size
    assert f"added to the {len(TASKS) - 1}-task library" in growth.line(g) and "kept byte-identical" in growth.line(g)
    title, header, rows = growth_table(g)  # the report's table
    assert growth.GROWN in title and len(rows) == 2 and len(header) == len(rows[0])
    assert rows[0][1] == str(g["new_steps"]) and rows[0][4] == f"{len(TASKS)} of {len(TASKS)} byte-identical"
    assert rows[1][1] == str(g["mixed_steps"])


def test_a_second_run_adds_nothing(grown):
    cfg, out, _, _ = grown
    before = files(out)
    assert growth.train(cfg, out, TASKS, Console(file=io.StringIO())) is None
    assert files(out) == before


def test_an_adapter_whose_bytes_changed_is_not_counted_kept(grown):
    _, out, _, _ = grown
    lib = Library.open(out)
    before = growth._hashes(lib)
    before["antonym"] = "0" * 64
    assert growth.summary(before, lib, 1.0)["kept"] == len(before) - 1


def test_paired_line_reports_the_geometric_mean_and_its_standard_error():
    rows = [{"task": f"t{i}", "chain": c, "mixed": m} for i, (c, m) in enumerate([(9, 10), (8, 10), (11, 10), (9, 10)])]
    p = tables.paired({"perplexity": rows})
    d = [math.log(c / m) for c, m in [(9, 10), (8, 10), (11, 10), (9, 10)]]
    mean = sum(d) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4)
    assert p["tasks"] == 4 and p["wins"] == 3
    assert p["change"] == pytest.approx(math.exp(mean) - 1) and p["se"] == pytest.approx(se)
    assert not p["beyond_2se"] and "no clear winner" in tables.paired_line({"perplexity": rows})
    clear = [{"task": f"t{i}", "chain": 5 + i * 0.01, "mixed": 10} for i in range(5)]
    assert tables.paired({"perplexity": clear})["beyond_2se"]
    assert "beyond two standard errors: chain is better" in tables.paired_line({"perplexity": clear})
    assert tables.paired({"perplexity": rows[:1]}) is None and tables.paired_line({"perplexity": []}) == ""
