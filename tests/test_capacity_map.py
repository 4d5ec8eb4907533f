"""bench/capacity_report.py, bench/capacity.py's reading of its saved rows: the paired map, the
"beyond two standard errors" line and the plot (synthetic rows; the sweep itself runs for hours and is not a test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

TASKS = [f"t{i}" for i in range(10)]


@pytest.fixture(scope="module")
def capacity():
    sys.path.insert(0, str(REPO / "bench"))
    import capacity_report

    return capacity_report


def _row(system: str, seed: int, chain_factor: float, mixed: float = 20.0, loss: float | None = None) -> dict:
    """One chain library's scores: the mixed adapter at `mixed` (+ a per-task wobble), the chain at
    `chain_factor` times it; or mixed10's one adapter."""
    ppl = {t: mixed + i + seed for i, t in enumerate(TASKS)}
    if system in ("mixed10", "mixed10a"):
        steps = {"finetune": {"steps": 100, "best": 50, "loss": loss}}
        return {"rank": 1, "seed": seed, "system": system, "train_s": 60.0, "steps": steps,
                "perplexity": {t: {system: p * chain_factor} for t, p in ppl.items()},
                "exact_match": {t: {system: 0.1} for t in TASKS}}
    wobble = [1.0 + (0.01 if i % 2 else -0.01) for i in range(len(TASKS))]
    return {"rank": 1, "seed": seed, "system": system, "train_s": 60.0, "steps": {},
            "perplexity": {t: {"mixed": p, "own": p * chain_factor * w, "chain": p * chain_factor * w}
                           for (t, p), w in zip(ppl.items(), wobble)},
            "exact_match": {t: {"mixed": 0.1, "own": 0.2, "chain": 0.2} for t in TASKS}}


def test_map_bolds_what_is_beyond_two_standard_errors_and_says_so(capacity, tmp_path):
    rows = [_row("none", s, 0.8) for s in (0, 1)] + [_row("warm", s, 1.0) for s in (0, 1)] + \
           [_row("mixed10", 0, 1.3)]
    m = capacity.map_table(rows)
    none_row = next(line for line in m.splitlines() if line.startswith("| none routed"))
    assert "**-20.0% ± " in none_row and "(2s)" in none_row  # 20% ahead on every task, two seeds
    warm_row = next(line for line in m.splitlines() if line.startswith("| warm routed"))
    assert "**" not in warm_row  # a tie with task-to-task noise is not bold
    assert not any(line.startswith(("| residual routed", "| mixed10 (alpha")) for line in m.splitlines())  # not run
    f = capacity.findings(rows)
    ppl, em = f.split("Exact match")
    assert "ahead of the same-rank mixed adapter: none routed at rank 1 (-20.0%" in ppl and "2 seeds" in ppl
    assert "behind it: mixed10 at rank 1 (+30.0%" in ppl and "warm" not in ppl
    # exact match: every chain answers 0.2 where the mixed adapter answers 0.1 (no spread: beyond 2 SE)
    assert "none routed at rank 1 (+10.0 points ± 0.0, 2 seeds)" in em and "warm routed at rank 1" in em
    assert em.endswith("behind it: none.")
    assert "| none routed | **+10.0 ± 0.0** (2s) |" in capacity.map_table(rows, "em")
    rows.append(_row("mixed10a", 0, 0.9))  # the alpha check, under its own label
    assert "| mixed10 (alpha 2r) | **-10.0% ± 0.0** (1s) |" in capacity.map_table(rows)
    assert "mixed10 (alpha 2r) at rank 1 (-10.0%" in capacity.findings(rows)
    assert "rank 1, seed 0, mixed10a" in capacity.stops(rows)
    assert "validation's alpha" not in capacity.map_table(rows)  # no validation losses recorded: no choice
    capacity.plot(rows, tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_beyond_two_standard_errors_is_said_plainly(capacity):
    rows = [_row("none", s, 1.0) for s in (0, 1)]
    for r in rows:  # exact match tied too
        r["exact_match"] = {t: {k: 0.1 for k in v} for t, v in r["exact_match"].items()}
    assert capacity.findings(rows) == ("Beyond two standard errors (paired over seed x task). Answer perplexity, "
                                       "ahead of the same-rank mixed adapter: none; behind it: none. Exact match, "
                                       "ahead of the same-rank mixed adapter: none; behind it: none.")


def test_the_same_disk_adapter_at_the_alpha_validation_prefers(capacity):
    """Of mixed10 (alpha 20r) and mixed10a (alpha 2r) the one with the lower best validation loss
    stands for the same-disk adapter: the test split decides nothing."""
    rows = [_row("none", 0, 1.0), _row("mixed10", 0, 1.3, loss=3.2), _row("mixed10a", 0, 0.9, loss=3.0)]
    cell = capacity.cells(rows)[(1, 0)]
    assert cell[capacity.BEST_ALPHA] is cell["mixed10 (alpha 2r)"]
    rows[1]["steps"]["finetune"]["loss"] = 2.9  # now alpha 20r validates better, though its test is worse
    cell = capacity.cells(rows)[(1, 0)]
    assert cell[capacity.BEST_ALPHA] is cell["mixed10"]
    assert "| mixed10 (validation's alpha) | **+30.0% ± 0.0** (1s) |" in capacity.map_table(rows)
    assert "validation loss 2.900" in capacity.stops(rows)


def test_a_residual_branch_is_also_paired_with_the_mixed_adapter_of_twice_its_rank(capacity):
    """A residual branch is served at rank 2r (the trunk's factors and its own): its row against
    the rank-2r mixed adapter of the same seed."""
    rows = [_row("none", 0, 1.0), _row("residual", 0, 0.8)]
    twice = _row("none", 0, 1.0, mixed=25.0)
    twice["rank"] = 2
    rows.append(twice)
    m = capacity.map_table(rows)
    line = next(x for x in m.splitlines() if x.startswith("| residual routed vs mixed 2r"))
    # 0.8 x (20 + i) against 25 + i, task by task: ahead at rank 1; nothing at rank 2 (no rank 4)
    assert line.split(" | ")[1].startswith("**-") and line.endswith("| — |")


def test_backfill_fills_only_the_same_run_of_the_same_regime(monkeypatch, tmp_path):
    """--backfill adds validation losses to older rows from libraries still on disk: only a library
    whose step counts match the row's (the same run), only under this regime's sweep directories
    (runs/bench-capacity-40 and -40-*, not -400), and the results file keeps every row."""
    sys.path.insert(0, str(REPO / "bench"))
    import capacity
    from chainlora.library.store import Library

    monkeypatch.setattr(capacity, "REPO", tmp_path)
    monkeypatch.setattr(capacity, "BENCH", tmp_path)
    entry = {"name": "a", "steps": 64, "early_stopping": {"best_step": 40, "best_validation_loss": 2.5}}
    saved = {"bench-capacity-40/r1-s0/none": [entry],
             "bench-capacity-400/r1-s0/warm": [entry],                 # another regime: never read
             "bench-capacity-40-a/r1-s0/residual": [{**entry, "steps": 30}]}  # another run: other steps
    for leaf in saved:
        (tmp_path / "runs" / leaf).mkdir(parents=True)
    monkeypatch.setattr(Library, "open", staticmethod(lambda path: SimpleNamespace(
        tasks=saved[str(Path(path).relative_to(tmp_path / "runs"))], trunk=None, mixed=None)))
    old = {"a": {"steps": 64, "best": 40}}
    rows = [{"rank": 1, "seed": 0, "system": s, "budget": 640, "steps": old} for s in ("none", "warm", "residual")]
    rows.append({"rank": 1, "seed": 1, "system": "none", "budget": 640, "steps": {"a": {**old["a"], "loss": 3.0}}})
    capacity.results_file("40").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert capacity.backfill("40") == 1
    after = capacity.load("40")
    assert [r["steps"]["a"].get("loss") for r in after] == [2.5, None, None, 3.0]
    assert [(r["rank"], r["seed"], r["system"]) for r in after] == [(r["rank"], r["seed"], r["system"]) for r in rows]
    assert capacity.backfill("40") == 0  # nothing left to fill: the file is not rewritten


def test_the_rslora_sweep_fixes_alpha_and_keeps_its_own_rows_and_libraries(monkeypatch, tmp_path):
    """--rslora: every system at alpha 2 with lora.use_rslora (the same-disk adapter too, at rank
    10r); its rows, libraries and section are named rslora-REGIME, which the plain sweep never reads."""
    sys.path.insert(0, str(REPO / "bench"))
    import capacity
    from chainlora.train import config

    def cfg(system: str, rslora: bool):
        args = SimpleNamespace(eval_steps=10, validation_per_task=8, patience=4, per_task=16, rslora=rslora)
        return config.load(REPO / "configs" / "demo.yaml", capacity.overrides(4, 0, system, 640, 40, args))

    for system, rank in (("none", 4), ("residual", 4), ("mixed10", 40)):
        on = cfg(system, True)
        assert on.lora.use_rslora and on.lora.alpha == 2 and on.lora.r == rank, system
    off = cfg("mixed10", False)
    assert not off.lora.use_rslora and (off.lora.r, off.lora.alpha) == (40, 80)
    assert [capacity.sweep_key(40), capacity.sweep_key(None), capacity.sweep_key(40, True)] == ["40", "all", "rslora-40"]
    monkeypatch.setattr(capacity, "REPO", tmp_path)
    for d in ("bench-capacity-40", "bench-capacity-40-s2", "bench-capacity-rslora-40"):
        (tmp_path / "runs" / d / "r1-s0" / "none").mkdir(parents=True)
    row = {"rank": 1, "seed": 0, "system": "none"}
    found = {key: [p.parent.parent.name for p in capacity.saved_libraries(key, row)] for key in ("40", "rslora-40")}
    assert found == {"40": ["bench-capacity-40", "bench-capacity-40-s2"], "rslora-40": ["bench-capacity-rslora-40"]}


def test_warm_and_residual_start_from_each_others_library_else_nones(monkeypatch, tmp_path):
    """The chain systems share the selector and mixed adapter (none's) and warm and residual share
    the trunk: each starts from a finished sibling's library so that only what differs trains."""
    sys.path.insert(0, str(REPO / "bench"))
    import capacity
    from chainlora import train as train_pkg
    from chainlora.train import config

    seen: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(config, "load", lambda path, overrides: overrides)
    monkeypatch.setattr(train_pkg, "train_library", lambda cfg, lib, **kw: seen.append(
        (lib.name, sorted(p.name for p in lib.iterdir()) if lib.exists() else [])))
    args = SimpleNamespace(eval_steps=10, validation_per_task=8, patience=4, per_task=16, rslora=False)
    seed_dir = tmp_path / "r8-s1"
    (seed_dir / "none").mkdir(parents=True)
    (seed_dir / "none" / "from-none").write_text("")
    (seed_dir / ".warm.partial").mkdir()  # an unfinished sibling is never copied
    capacity.train(8, 1, "residual", 640, 40, args, tmp_path)
    assert seen[-1] == ("residual", ["from-none"])
    (seed_dir / "residual" / "trunk").write_text("")
    capacity.train(8, 1, "warm", 640, 40, args, tmp_path)
    assert seen[-1] == ("warm", ["from-none", "trunk"])  # residual's, trunk included
    capacity.train(8, 1, "none", 640, 40, args, tmp_path)
    assert seen[-1] == ("none", ["from-none"])  # none starts from nothing but its own
    # a chain library copied from none's before its sibling had a trunk is set aside, not trained on
    stale = tmp_path / "r4-s1"
    for name in ("none", "warm", ".warm.partial", "residual"):
        (stale / name).mkdir(parents=True)
    (stale / "residual" / "trunk").write_text("")
    capacity.train(4, 1, "warm", 640, 40, args, tmp_path)
    assert seen[-1] == ("warm", ["trunk"])
    assert sorted(p.name.split("-")[1] for p in stale.glob(".stale-*")) == ["warm", "warm.partial"]


def test_where_each_adapter_stopped_counts_those_still_improving_at_the_cap(capacity):
    """A task adapter whose best checkpoint is its last step was still improving when the cap
    stopped it: the count says where the cap, not the system, decided."""
    row = _row("none", 0, 1.0)
    row["steps"] = {t: {"steps": 64, "best": 64 if i < 3 else 20, "loss": 2.0} for i, t in enumerate(TASKS)}
    row["steps"]["mixed"] = {"steps": 460, "best": 420, "loss": 2.5}
    line = capacity.stops([row])
    assert "task adapters' best step median 20 (range 20-64; 3 of 10 best at their last step)" in line
    assert "mixed best 420 of 460 run" in line
