"""Benchmark: the demo library on the test records the demo never scores.

`make demo` scores Table I on the first 16 test records of each task; the bundled test split has
150 a task. This scores the other 134 a task (1,340 records) for the mixed adapter and the chain
(routed by the library's default selector, as the demo routes), paired by task: the geometric-
mean change, its standard error over tasks, and the tasks the chain wins. Nothing here changes
the demo or its config (a number to read, never to tune on).

    .venv/bin/python bench/demo_unseen.py [--library runs/demo/library]   # about 3 min on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(library: Path) -> dict:
    from chainlora.data.records import load_demo
    from chainlora.demo.pipeline import SCORED_PER_TASK
    from chainlora.eval import tables
    from chainlora.eval.evaluate import evaluate
    from chainlora.inference.engine import Engine

    engine = Engine.load(library)
    demo = load_demo()
    records = [r for t in engine.tasks for r in demo[t].test[SCORED_PER_TASK:]]
    t0 = time.perf_counter()
    ev = evaluate(engine, records, generate=False, arrow=False, selectors=[engine.selector])
    return {"rows": ev["perplexity"], "paired": tables.paired(ev), "line": tables.paired_line(ev),
            "selector": ev["selector"], "n": ev["n"], "skipped": SCORED_PER_TASK,
            "seconds": round(time.perf_counter() - t0, 1)}


def render(res: dict, library: Path) -> str:
    p = res["paired"]
    lines = [f"Library: `{library}` (as `make demo` trains it); {res['n']} test records (each task's records "
             f"after the first {res['skipped']}), chain routed by `{res['selector']}`; {platform.machine()}, "
             f"{platform.python_version()}, torch CPU, {res['seconds']:.0f} s.",
             "Command: `python bench/demo_unseen.py`", "",
             "| task | records | mixed PPL | chain PPL | change | routed right |", "|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['task']} | {r['n']} | {r['mixed']:.2f} | {r['chain']:.2f} | "
                     f"{r['chain'] / r['mixed'] - 1:+.1%} | {r['routed_right']:.1%} |")
    lines += ["", f"Paired over {p['tasks']} tasks: {p['change']:+.1%} ± {p['se']:.1%} (geometric mean ± 1 SE), "
                  f"chain ahead on {p['wins']}; beyond two standard errors: {'yes' if p['beyond_2se'] else 'no'}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--library", default=str(REPO / "runs" / "demo" / "library"))
    args = ap.parse_args()
    library = Path(args.library)
    res = measure(library)
    shown = library.resolve().relative_to(REPO) if library.resolve().is_relative_to(REPO) else library
    section = render(res, shown)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_md import write_section

    write_section("demo-unseen", section, "## The demo library on test records the demo never scores — "
                                          "`bench/demo_unseen.py` (issue 36)")
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
