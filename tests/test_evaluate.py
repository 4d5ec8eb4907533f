"""Evaluation: the perplexity formula, selection tables and task metrics, on a tiny library."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from chainlora.data import Record, load_demo
from chainlora.data.records import heldout_templates
from chainlora.eval import evaluate
from chainlora.inference.engine import Engine

TASKS = ["antonym", "sentiment", "rhyme", "hypernym", "definition"]


@pytest.fixture(scope="module")
def engine(random_lib):
    return Engine.load(random_lib, device="cpu")


@pytest.fixture(scope="module")
def records():
    demo = load_demo()
    return [r for t in TASKS for r in demo[t].test[:3]]


def test_pooled_nll_is_token_weighted_over_answers_only(engine):
    """Σ NLL over answer tokens equals the per-record sums (each record's mean loss x its
    answer tokens, from the model's own loss) — the mean of means would differ."""
    from chainlora.data.examples import answer_pairs, collator, tokenize

    recs = [Record("antonym", "Give the antonym of hot.", "cold"),
            Record("antonym", "Give the antonym of up.", "a very long answer with many more tokens in it")]
    total, count = evaluate.pooled(evaluate.record_nll(engine, recs, "antonym"))
    model = engine.cache.acquire(["antonym"])
    by_record = []
    for pair in answer_pairs(recs):
        row = collator(engine.tok)([tokenize(engine.tok, pair, 1024, engine.system)])
        n = int((row["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(**row, adapter_names=[engine.cache.slot("antonym")]).loss.item()
        by_record.append((loss * n, n))
    assert count == sum(n for _, n in by_record)
    assert total == pytest.approx(sum(s for s, _ in by_record), rel=1e-5)
    assert evaluate.perplexity(total, count) == pytest.approx(math.exp(total / count))
    mean_of_means = sum(s / n for s, n in by_record) / 2
    assert abs(mean_of_means - total / count) > 1e-3  # the two formulas really differ here


def test_text_metrics():
    assert evaluate.exact_match(" Cold. ", "cold") and not evaluate.exact_match("cold front", "cold")
    assert evaluate.token_f1("the cold one", "cold") == pytest.approx(0.5)
    assert evaluate.token_f1("", "") == 1.0 and evaluate.token_f1("x", "") == 0.0
    assert evaluate.chrf(["maison"], ["maison"]) == pytest.approx(100.0)
    assert 0 < evaluate.chrf(["maisons"], ["maison"]) < 100


def test_evaluate_tables_are_consistent(engine, records):
    result = evaluate.evaluate(engine, records, per_task=3, max_new_tokens=4)
    rows = {r["task"]: r for r in result["perplexity"]}
    assert list(rows) == TASKS and all(r["n"] == 3 for r in rows.values())
    for r in rows.values():
        assert all(v > 1 for k, v in r.items() if k in ("base", "own", "mixed", "chain"))
    by_task = evaluate.by_task_of(engine, records, 3)
    for task, adapters in result["routes"].items():  # the chain: each record on the adapter it was routed to
        per = [evaluate.record_nll(engine, [rec], a)[0] for rec, a in zip(by_task[task], adapters)]
        assert rows[task]["chain"] == pytest.approx(evaluate.perplexity(*evaluate.pooled(per)), rel=1e-6)
        assert rows[task]["routed_right"] == pytest.approx(sum(a == task for a in adapters) / 3)
    assert result["perplexity_mean"]["own"] == pytest.approx(sum(r["own"] for r in rows.values()) / 5)
    assert result["chain_beats_mixed"] == sum(r["chain"] < r["mixed"] for r in rows.values())
    sel = result["selection"]
    assert list(sel) == ["score", "generate"]
    for s in sel.values():
        assert s["n"] == 15 and 0 <= s["top1"] <= s["top3"] <= 1
        assert sum(sum(row.values()) for row in s["confusion"].values()) == 15
        right = sum(s["confusion"][t][t] for t in TASKS)
        assert s["top1"] == pytest.approx(right / 15)
        assert all(0 <= v["recall"] <= 1 for v in s["per_task"].values())
    m = result["metrics"]
    assert set(m) == set(TASKS) and set(m["antonym"]) == {"base", "mixed", "chain", "arrow"}
    assert all(0 <= v["exact_match"] <= 1 and 0 <= v["chrf"] <= 100 for t in m.values() for v in t.values())
    assert len(result["answers"]["chain"]["rhyme"]) == 3


@pytest.mark.slow
def test_eval_cli_writes_nan_free_json(random_lib, tmp_path, cli):
    lib = tmp_path / "lib"
    shutil.copytree(random_lib, lib)
    r = cli("eval", str(lib), "--data", "demo", "--per-task", "2", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    saved = json.loads((lib / "eval/demo.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved["n"] == out["n"] == 10 and saved["data"] == "demo"
    demo = load_demo()  # the records --per-task 2 takes: the first two test records of each task
    held = heldout_templates(demo)
    expect = sum(r.meta["template"] in held[t] for t in TASKS for r in demo[t].test[:2])
    assert expect > 0 and saved["selection"]["score"]["heldout_n"] == expect
    assert 0 <= saved["selection"]["score"]["heldout_top1"] <= 1
    r = cli("eval", str(lib), "--data", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"task": "poetry", "instruction": "x", "output": "y"}) + "\n")
    r = cli("eval", str(lib), "--data", str(other))
    assert r.returncode == 2 and "no records of this library's tasks" in r.stderr


def test_chain_perplexity_scores_each_record_under_its_routed_adapter(engine, records):
    """Hand-made routes (some right, some to another task, one fallback to mixed): the chain's
    perplexity is exp of Σ over records of that record's NLL under ITS adapter."""
    from chainlora.inference.engine import Route

    by_task = evaluate.by_task_of(engine, records, 3)
    plan = {"antonym": ["antonym", "rhyme", "mixed"], "sentiment": ["sentiment"] * 3}
    by_task = {t: by_task[t] for t in plan}
    routes = {t: [Route(a, 1.0, [], a == "mixed", a, "test") for a in adapters] for t, adapters in plan.items()}
    rows = {r["task"]: r for r in evaluate.perplexity_table(engine, by_task, routes)}
    expect = [evaluate.record_nll(engine, [rec], a)[0] for rec, a in zip(by_task["antonym"], plan["antonym"])]
    assert rows["antonym"]["chain"] == pytest.approx(
        math.exp(sum(n for n, _ in expect) / sum(k for _, k in expect)), rel=1e-6)
    assert rows["antonym"]["routed_right"] == pytest.approx(1 / 3)
    assert rows["sentiment"]["chain"] == pytest.approx(rows["sentiment"]["own"], rel=1e-9)


def test_task_metrics_batches_across_tasks_without_changing_answers(engine, records):
    """Answers come from batches that mix tasks (and, for the chain, adapters); each record's
    answer is the one it gets alone on its adapter."""
    from chainlora.inference.engine import Route

    by_task = evaluate.by_task_of(engine, records, 3)
    plan = {t: [t, "mixed", TASKS[(i + 1) % len(TASKS)]] for i, t in enumerate(by_task)}
    routes = {t: [Route(a, 1.0, [], a == "mixed", a, "test") for a in adapters] for t, adapters in plan.items()}
    metrics, answers = evaluate.task_metrics(engine, by_task, routes, max_new_tokens=4, batch_size=4)
    assert list(answers) == ["base", "mixed", "chain"] and set(metrics) == set(by_task)
    for task, recs in by_task.items():
        for rec, adapter, got in zip(recs, plan[task], answers["chain"][task]):
            assert got == engine.generate([rec.text], task=adapter, max_new_tokens=4)[0].text
        assert answers["mixed"][task] == [a.text for a in engine.generate([r.text for r in recs], task="mixed",
                                                                          max_new_tokens=4)]
        assert metrics[task]["chain"]["exact_match"] == pytest.approx(
            sum(evaluate.exact_match(p, r.output) for p, r in zip(answers["chain"][task], recs)) / 3)
