"""The evaluation commands of the `chainlora` CLI: eval, judge, annotate, report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from chainlora.errors import ChainloraError


def load_engine(args: argparse.Namespace):
    """The library of `args.library` with the selector options every inference command takes."""
    from chainlora.inference.engine import Engine

    return Engine.load(args.library, device=args.device, selector=args.selector, threshold=args.threshold,
                       novelty=not args.no_novelty, gate=not args.no_gate)


def held_out_records(engine, records, include_train: bool):
    """The records of the library's tasks it never trained on (eval.heldout); what was left out
    goes to stderr in one line each, so `--json` stays one object."""
    from chainlora.eval.heldout import held_out

    chosen = held_out(engine.lib, engine.tasks, records, include_train)
    for note in chosen.notes():
        print(f"chainlora: {note}", file=sys.stderr, flush=True)
    return chosen


def cmd_eval(args: argparse.Namespace) -> int:
    from chainlora.console import console as make_console

    from chainlora.eval import tables
    from chainlora.eval.evaluate import evaluate, load_eval_data, save_eval

    records, heldout, name = load_eval_data(args.data)
    engine = load_engine(args)
    chosen = held_out_records(engine, records, args.include_train)
    result = evaluate(engine, chosen.records, heldout=heldout, per_task=args.per_task, generate=not args.no_generate,
                      max_new_tokens=args.max_new_tokens, arrow=not args.no_arrow)
    result["records"] = chosen.as_dict()
    path = save_eval(engine.lib.root, args.name or name, result, args.data)
    if args.json:
        print(json.dumps(json.loads(path.read_text())))
        return 0
    console = make_console()
    console.print(tables.perplexity(result))
    if result["selection"]:
        console.print(tables.selection(result))
    if "metrics" in result:
        console.print(tables.metrics(result))
    console.print(f"wrote {path}")
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from chainlora.console import console as make_console

    from chainlora.eval import judge
    from chainlora.eval.evaluate import by_task_of, load_eval_data, save_eval

    records, _, name = load_eval_data(args.data)
    engine = load_engine(args)
    records = held_out_records(engine, records, args.include_train).records
    chosen = [r for rs in by_task_of(engine, records, args.per_task).values() for r in rs]
    result = judge.run(engine, chosen, url=args.judge_url, model=args.judge_model,
                       api_key=os.environ.get(args.api_key_env) or None,
                       cache=Path(engine.lib.root) / "eval" / "judge-cache.jsonl",
                       systems=[s.strip() for s in args.systems.split(",") if s.strip()],
                       concurrency=args.concurrency, timeout_s=args.timeout, max_new_tokens=args.max_new_tokens)
    path = save_eval(engine.lib.root, f"judge-{args.name or name}", result, args.data)
    if args.json:
        print(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "ratings"}))
        return 0
    from rich.table import Table

    t = Table(title=f"Table IV — helpfulness 1-6 by {args.judge_model} (LIMA rubric)")
    for c in ("system", "answers", "scored", "missing", "mean", "1", "2", "3", "4", "5", "6"):
        t.add_column(c, justify="left" if c == "system" else "right")
    for system, s in result["summary"].items():
        mean = f"{s['mean']:.2f}" if s["mean"] is not None else "—"
        t.add_row(system, str(s["n"]), str(s["scored"]), str(s["missing"]), mean,
                  *[str(s["distribution"][str(k)]) for k in range(1, 7)])
    make_console().print(t)
    print(f"{result['calls']} judge calls (the rest from {engine.lib.root / 'eval' / 'judge-cache.jsonl'}); wrote {path}")
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from chainlora.eval import annotate

    if args.action == "export":
        from chainlora.eval.evaluate import by_task_of, load_eval_data

        if not args.data or not args.out:
            raise ChainloraError("annotate export: needs LIB, --data and --out")
        annotate.check_out(Path(args.out))
        records, _, _ = load_eval_data(args.data)
        args.library = args.target
        engine = load_engine(args)
        records = held_out_records(engine, records, args.include_train).records
        chosen = [r for rs in by_task_of(engine, records, args.per_task).values() for r in rs]
        info = annotate.export(engine, chosen, Path(args.out), seed=args.seed, max_new_tokens=args.max_new_tokens,
                               systems=[s.strip() for s in args.systems.split(",") if s.strip()])
        print(f"{info['items']} items: give annotators {Path(args.out) / 'sheet.html'} (or sheet.csv); "
              f"keep {Path(args.out) / 'key.json'} to yourself")
        return 0
    if not args.sheets:
        raise ChainloraError("annotate import: give the export directory and one or more filled sheets")
    result = annotate.import_sheets(Path(args.target), [Path(p) for p in args.sheets])
    from chainlora import atomic
    from chainlora.eval.evaluate import json_safe

    atomic.write_json(Path(args.target) / "results.json", json_safe(result))
    if args.json:
        print(json.dumps(json_safe(result)))
        return 0
    from chainlora.console import console as make_console
    from rich.table import Table

    t = Table(title=f"Table IV — human ratings ({len(result['annotators'])} annotators)")
    for c in ("system", "ratings", "Fail", "Pass", "Excellent"):
        t.add_column(c, justify="left" if c == "system" else "right")
    for system, v in result["systems"].items():
        t.add_row(system, str(v["n"]), *[f"{v[r.lower() + '_rate']:.0%}" if v["n"] else "—" for r in annotate.RATINGS])
    make_console().print(t)
    for pair, v in result["cohen_kappa"].items():
        print(f"Cohen's kappa {pair}: {v['cohen_kappa']:.3f} over {v['items']} items")
    if result["fleiss_kappa"] is not None:
        print(f"Fleiss' kappa: {result['fleiss_kappa']:.3f} over {result['fleiss_items']} items rated by all")
    print(f"wrote {Path(args.target) / 'results.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from chainlora.eval.report import build

    html_path, md_path = build(args.library, human=args.human, eval_name=args.eval, sweeps=args.sweep or [])
    print(f"report: {html_path}  (Markdown: {md_path})")
    return 0
