"""The budget sweep's tables (chainlora.eval.sweep): each chain counted against the mixed adapter
of the same compute, oracle routing apart, bad result files named by line, and the sweep in
`chainlora report --sweep`."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from chainlora.errors import ChainloraError
from chainlora.eval import sweep

TASKS = ("a", "b", "c")


def row(budget: int, seed: int, mode: str, chain: tuple, mixed: tuple, own: tuple, arrow: tuple | None = None) -> dict:
    ppl = {t: {"chain": c, "mixed": m, "own": o, "routed_right": 1.0} for t, c, m, o in zip(TASKS, chain, mixed, own)}
    em = {t: {"chain": 0.5, "mixed": 0.25} for t in TASKS}
    if arrow:
        for t, a in zip(TASKS, arrow):
            ppl[t]["arrow"], em[t]["arrow"] = a, 0.0
    return {"budget": budget, "seed": seed, "mode": mode, "perplexity": ppl, "exact_match": em,
            "selector": "encoder", "top1": 1.0}


@pytest.fixture
def rows() -> list[dict]:
    out = []
    for seed in (0, 1):
        # from zero: the chain wins on one task; warm/residual against the trunk-continued mixed
        out.append(row(80, seed, "none", chain=(9, 20, 30), mixed=(10, 10, 10), own=(9, 21, 31), arrow=(11, 12, 9)))
        out.append(row(80, seed, "warm", chain=(4, 5, 30), mixed=(8, 8, 8), own=(4, 5, 7)))
        out.append(row(80, seed, "residual", chain=(9, 9, 9), mixed=(8, 8, 8), own=(7, 9, 9)))
    return out


def test_chains_count_against_the_mixed_adapter_of_the_same_compute(rows):
    by = sweep.summary(rows)
    assert [r["wins"] for r in by[(80, "chain none")]] == [1, 1]  # against mixed from zero (10s)
    assert [r["wins"] for r in by[(80, "arrow")]] == [1, 1]
    assert [r["wins"] for r in by[(80, "chain warm")]] == [2, 2]  # against the trunk-continued mixed (8s)
    assert [r["wins"] for r in by[(80, "chain residual")]] == [0, 0]
    assert by[(80, "mixed")][0]["wins"] is None and by[(80, "mixed (trunk)")][0]["geomean"] == pytest.approx(8.0)
    assert by[(80, "chain warm")][0]["geomean"] == pytest.approx(math.exp((math.log(4) + math.log(5) + math.log(30)) / 3))
    assert by[(80, "chain warm")][0]["em"] == 0.5 and by[(80, "mixed")][0]["em"] == 0.25


def test_tables_and_oracle_routing(rows):
    ppl, em, oracle, paired, per_task = sweep.tables(rows)
    assert ppl[1] == ["budget (steps)", *sweep.SYSTEMS]
    cells = dict(zip(ppl[1], ppl[2][0]))
    assert cells["budget (steps)"] == "80 (2 seeds)"
    assert cells["chain warm"].endswith("[2.0 ± 0.0 of 3]") and cells["mixed"] == "10.00 ± 0.00"
    assert dict(zip(em[1], em[2][0]))["chain none"] == "0.500 ± 0.000"
    # oracle: own warm (4, 5, 7) beats 8 on all three tasks, own residual (7, 9, 9) on one
    own = dict(zip(oracle[1], oracle[2][0]))
    assert own["own warm"].endswith("[3.0 ± 0.0]") and own["own residual"].endswith("[1.0 ± 0.0]")
    assert [r[0] for r in per_task[2]] == list(TASKS)
    # paired: warm (4, 5, 30) against 8s, the same in both seeds: mean log ratio, standard error 0.22
    logs = [math.log(4 / 8), math.log(5 / 8), math.log(30 / 8)] * 2
    mean = sum(logs) / 6
    se = (sum((x - mean) ** 2 for x in logs) / 5) ** 0.5 / 6 ** 0.5
    assert dict(zip(paired[1], paired[2][0]))["chain warm"] == f"{math.expm1(mean):+.1%} ± {se:.1%} (n=6)"
    assert "routed by the library's default selector (encoder" in sweep.routing_note(rows)
    md = sweep.markdown(sweep.tables(rows))
    assert md.count("| budget (steps) |") == 4 and "| a |" in md


def test_load_names_the_bad_line(tmp_path, rows):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + "{not json\n")
    with pytest.raises(ChainloraError, match=r"results.jsonl:3: malformed JSON"):
        sweep.load(tmp_path)
    path.write_text(json.dumps({"budget": 80}) + "\n")
    with pytest.raises(ChainloraError, match=r"results.jsonl:1: not a chain_vs_mixed result row"):
        sweep.load(path)
    with pytest.raises(ChainloraError, match="no sweep results"):
        sweep.load(tmp_path / "missing")


def test_report_shows_the_sweep(random_lib, tmp_path, rows):
    from chainlora.cli import main

    lib = tmp_path / "lib"
    shutil.copytree(random_lib, lib)
    runs = tmp_path / "sweep"
    runs.mkdir()
    (runs / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(lib), "--sweep", str(runs)]) == 0
    page = (lib / "report.html").read_text()
    assert "Budget sweep — geometric mean answer perplexity" in page and "80 (2 seeds)" in page
    assert f"Chain vs mixed against budget — {runs}" in re.findall(r'<img alt="([^"]+)"', page)
    assert (lib / "report" / "sweep0.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(lib), "--sweep", str(tmp_path / "nothing")]) == 2
