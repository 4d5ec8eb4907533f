"""Benchmark the task selectors of a trained library (default: the demo library): Table III.

S1  every selector on the bundled test split: top-1, top-3, top-1 on the held-out instruction
    template (wording no selector saw), ms per instruction, training time and disk size.
S2  top-1 of every selector on hand-written paraphrases of the ten demo tasks
    (bench/data/paraphrases.jsonl: 6 a task, worded unlike any template).
S3  the library's default routing (selector, calibrated threshold and out-of-library detector,
    as `chainlora train` recorded them): how many requests fall back, on the test split, on the
    paraphrases and on hand-written out-of-library instructions (bench/data/out_of_library.jsonl:
    chat, knowledge, code, maths, other languages, other NLP tasks), and the top-1 of those kept.

    .venv/bin/python bench/selection.py [--library runs/demo/library] [--per-task 16] [--selectors a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / "data" / name).read_text().splitlines() if line.strip()]


def fallback(engine, texts: list[str], tasks: list[str] | None) -> dict:
    routes = engine.route(texts)
    fell = [r.fallback for r in routes]
    out = {"n": len(texts), "fallback": sum(fell) / len(texts),
           "reasons": {k: sum(r.reason == k for r in routes) for k in {r.reason for r in routes if r.reason}}}
    if tasks is not None:
        kept = [r.task == t for r, t in zip(routes, tasks) if not r.fallback]
        out["kept_top1"] = sum(kept) / len(kept) if kept else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default="runs/demo/library")
    parser.add_argument("--per-task", type=int, default=16, help="test records a task (the demo's 16)")
    parser.add_argument("--selectors", help="comma list to measure in S1 / S2 (default: all the library has)")
    args = parser.parse_args()

    import torch

    from chainlora.data import Record, heldout_templates, load_demo
    from chainlora.eval.evaluate import selection, selectors_of
    from chainlora.inference.engine import Engine

    engine = Engine.load(args.library, device="cpu")
    demo = load_demo()
    test = [r for t in engine.tasks for r in demo[t].test[:args.per_task]]
    para = [Record(p["task"], p["instruction"], "") for p in read("paraphrases.jsonl")]
    ood = [p["instruction"] for p in read("out_of_library.jsonl")]
    kinds = args.selectors.split(",") if args.selectors else selectors_of(engine)
    s1 = {k: selection(engine, test, k, heldout_templates(demo)) for k in kinds}
    s2 = {k: selection(engine, para, k) for k in kinds}
    sel = engine.lib.selection or {}
    s3 = {"test split": fallback(engine, [r.text for r in test], [r.task for r in test]),
          "paraphrases": fallback(engine, [r.text for r in para], [r.task for r in para]),
          "out of library": fallback(engine, ood, None)}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"library {args.library}; default selector `{engine.selector}` "
          f"({sel.get('chosen_by', 'not measured')}), threshold {engine.threshold:.3f}, "
          f"out-of-library detector {'on' if engine.similarity(['x']) is not None else 'off'}")
    print(f"\n| S1: test split, {len(test)} records | top-1 | top-3 | top-1 held-out template | "
          "ms / instruction | train s | disk MB |")
    print("|---|---|---|---|---|---|---|")
    for k, s in s1.items():
        print(f"| `{k}`{' (default)' if k == engine.selector else ''} | {s['top1']:.1%} | {s['top3']:.1%} | "
              f"{s['heldout_top1']:.1%} of {s['heldout_n']} | {s['ms_per_instruction']:.1f} | "
              f"{s['train_seconds'] or 0:.0f} | {s['disk_mb'] or 0:.1f} |")
    print(f"\n| S2: hand-written paraphrases, {len(para)} | top-1 | top-3 |")
    print("|---|---|---|")
    for k, s in s2.items():
        print(f"| `{k}` | {s['top1']:.1%} | {s['top3']:.1%} |")
    print("\n| S3: default routing | requests | fall back | why | top-1 of those kept |")
    print("|---|---|---|---|---|")
    for name, r in s3.items():
        why = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())) or "-"
        kept = f"{r['kept_top1']:.1%}" if r.get("kept_top1") is not None else "-"
        print(f"| {name} | {r['n']} | {r['fallback']:.1%} | {why} | {kept} |")


if __name__ == "__main__":
    main()
