"""`chainlora discover DATA --out DIR`: task labels for unlabelled records, and a config to train on them.

Writes DIR/records.jsonl (every record with its discovered `task`), DIR/config.yaml (ready for
`chainlora train DIR/config.yaml`), DIR/clusters.html and DIR/discover.json (what it wrote).
A non-empty DIR that discover did not write, or whose files were edited since, is refused. Bad
input (an empty file, too few records, all-identical instructions, --k above what the data
holds) exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from chainlora.errors import ChainloraError


def _k(value: str) -> Any:
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        raise ChainloraError(f"--k {value!r}: expected auto or a whole number")
    if k < 1:
        raise ChainloraError(f"--k {k}: must be at least 1")
    return k


def train_config(out: Path) -> dict:
    """A `chainlora train` config over DIR/records.jsonl: the demo's recipe (task adapters that
    branch from a shared trunk, the classifier selector), sized for a CPU; raise max_steps on a GPU."""
    return {
        "tasks": "all",
        "data": {"train": str((out / "records.jsonl").resolve()), "test_fraction": 0.1},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "chain": {"branch": "warm", "trunk_fraction": 0.5},
        "training": {"max_steps": 20, "batch_size": 8, "learning_rate": 2.0e-3, "max_length": 256},
        "classifier": {"enabled": True, "encoder": "minilm"},
        "output_dir": str((out / "library").resolve()),
    }


def config_yaml(cfg: dict, source: str, summary: dict) -> str:
    import yaml

    head = (f"# Written by `chainlora discover {source}`: {summary['records']} records, {summary['k']} tasks "
            f"(see clusters.html).\n# Rename tasks in records.jsonl if you like; then: chainlora train <this file>\n")
    return head + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


def cmd_discover(args: argparse.Namespace) -> int:
    from chainlora.data.records import read_records
    from chainlora.discover import discover, write_outputs
    from chainlora.discover.pipeline import UNLABELLED, check_out
    from chainlora.train import config

    out = Path(args.out)
    check_out(out)  # a folder of the user's is refused before any work (and again just before writing)
    k = _k(args.k)
    if args.min_size < 1:
        raise ChainloraError(f"--min-size {args.min_size}: must be at least 1")
    records = list(read_records(args.data, task=UNLABELLED))
    found = discover(records, k=k, min_size=args.min_size, seed=args.seed, source=args.data)
    cfg = train_config(out)
    config.from_dict(cfg, str(out / "config.yaml"))  # what train will read: checked before anything is written
    for path in write_outputs(found, out, config_yaml(cfg, args.data, found.summary)):
        print(f"wrote {path}")
    s = found.summary
    c = s["closest_pair"]
    how = ("k given" if s["k_mode"] == "given" else "k chosen: no two clusters answer differently enough"
           if c is None else f"k chosen: every pair of tasks answers differently, significance >= "
           f"{c['significance']:.2f}, effect >= {c['effect']:.4f}")
    ari = f"; adjusted Rand index against the records' own task fields: {s['given_labels_ari']:.3f}" \
        if s["given_labels_ari"] is not None else ""
    print(f"{s['records']} records -> {s['k']} tasks ({how}; {s['merged_records']} records of small "
          f"clusters merged){ari}")
    for name, n in s["tasks"].items():
        print(f"  {name:<32} {n:>7}")
    print(f"next: chainlora train {out / 'config.yaml'}")
    return 0


def add_discover_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("discover", help="find the task types of unlabelled records; write records, config and a report")
    d.add_argument("data", help="instruction records (.jsonl/.json/.csv/.parquet): instruction, input?, output")
    d.add_argument("--out", required=True, help="directory for records.jsonl, config.yaml and clusters.html")
    d.add_argument("--k", default="auto", help="number of tasks, or auto (default: chosen from the data)")
    d.add_argument("--min-size", type=int, default=10,
                   help="clusters with fewer records join the nearest other one (default: 10)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_discover)
