"""Task discovery on unlabelled data: quality on the demo data, and speed / memory at scale.

    python bench/discover.py              # the demo's train and test splits, labels removed
    python bench/discover.py --scale 100000   # also: 100,000 distinct records, time and peak RSS
    python bench/discover.py --table runs/bench-discover   # also: Table I, true vs discovered labels

Quality: the adjusted Rand index (ARI) of `chainlora.discover.discover` against the true demo
tasks and the k it chose with no hint, per split and per-task slice (the whole split, and the
first N records a task), seed 0. Scale: the demo's 9,500 records made distinct (each record's
instruction and answer get a unique "(#i)" tag, so nothing is embedded once for many records)
and repeated to N; time per stage and peak resident memory of this process.
Table I: two libraries trained with the demo config (same budget, same records): one on the
true labels, one with `tasks: auto` on the same train and test files with their task fields
removed; both scored on the demo's test records (16 a true task, as `chainlora demo`): answer
perplexity of each library's routed chain and of the mixed adapter, per true task.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time

from sklearn.metrics import adjusted_rand_score


def silhouette_k(records, encoder, truth) -> tuple[int, float]:
    """The k (2-30) the silhouette would choose on the same pooled template vectors and k-means
    partitions `discover` scans (silhouette of the records' own four-block vectors, on a seeded
    sample of 4,000): the internal index `discover` does not use, for comparison."""
    import numpy as np
    from sklearn.metrics import silhouette_score

    from chainlora.discover import cluster
    from chainlora.discover.features import features

    f = features(records, encoder, show_progress=False)
    points, weights = f.group_means(), f.weights()
    x = np.hstack([f.block(b) for b in range(len(f.blocks))])
    best = (-2.0, 0, 0.0)
    for k in range(2, min(30, f.n_groups - 1) + 1):
        labels = cluster.kmeans(points, weights, k, 0)[0][f.group]
        s = silhouette_score(x, labels, sample_size=min(4000, len(labels)), random_state=0)
        if s > best[0]:
            best = (s, k, adjusted_rand_score(truth, labels))
    return best[1], best[2]


def quality(encoder) -> list[str]:
    from chainlora.data.records import demo_path, read_records
    from chainlora.discover import discover

    rows = ["| split | records a task | records | templates | k chosen | ARI | seconds | closest pair at k: "
            "significance / effect | at k + 1 | silhouette's best k (ARI) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for split, slices in (("train", (None, 300)), ("test", (None, 100, 60, 40, 20))):
        records = list(read_records(demo_path(split)))
        for per in slices:
            by: dict = {}
            for r in records:
                by.setdefault(r.task, []).append(r)
            sub = [r for rs in by.values() for r in (rs if per is None else rs[:per])]
            t = time.perf_counter()
            found = discover(sub, encoder=encoder, show_progress=False)
            secs = time.perf_counter() - t
            ari = adjusted_rand_score([r.task for r in sub], [r.task for r in found.records])
            scan, k = found.summary["separation_by_k"], found.summary["k"]
            at = [f"{scan[kk][0]:.2f} / {scan[kk][1]:.4f}" if kk in scan else "-" for kk in (k, k + 1)]
            sk, sari = silhouette_k(sub, encoder, [r.task for r in sub])
            rows.append(f"| {split} | {per or 'all (' + str(len(sub) // len(by)) + ')'} | {len(sub)} | "
                        f"{found.summary['templates']} | {k} | {ari:.3f} | {secs:.1f} | {at[0]} | {at[1]} | {sk} ({sari:.3f}) |")
            print(rows[-1], flush=True)
    return rows


def scale(encoder, n: int) -> list[str]:
    from chainlora.data.records import demo_path, read_records
    from chainlora.discover import discover

    base = list(read_records(demo_path("train"))) + list(read_records(demo_path("test")))
    records = [dataclasses.replace(r, instruction=f"{r.instruction} (#{i})", output=f"{r.output} (#{i})")
               for i, r in zip(range(n), (base[i % len(base)] for i in range(n)))]
    t = time.perf_counter()
    found = discover(records, encoder=encoder, show_progress=True)
    secs = time.perf_counter() - t
    ari = adjusted_rand_score([r.task for r in records], [r.task for r in found.records])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return ["| records | seconds | records/s | k | ARI | peak RSS (MB) |", "|---|---|---|---|---|---|",
            f"| {n} | {secs:.0f} | {n / secs:.0f} | {found.summary['k']} | {ari:.3f} | {rss:.0f} |"]


def _unlabelled(src, dst) -> str:
    import gzip
    import json
    import random

    rows = [json.loads(line) for line in gzip.open(src, "rt")]
    random.Random(0).shuffle(rows)
    for r in rows:
        r.pop("task")
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(dst)


def table(out) -> list[str]:
    import math
    from importlib import resources
    from pathlib import Path

    import yaml

    from chainlora.data.records import demo_path, load_demo
    from chainlora.eval.evaluate import perplexity, pooled, record_nll
    from chainlora.inference.engine import Engine
    from chainlora.train import config
    from chainlora.train.run import train_library

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = yaml.safe_load((resources.files("chainlora") / "demo" / "config.yaml").read_text())
    unl = {s: _unlabelled(demo_path(s), out / f"{s}-unlabelled.jsonl") for s in ("train", "test")}
    libs = {}
    for name, over in (("true", {}), ("discovered", {"tasks": "auto", "data": {
            **demo["data"], "train": unl["train"], "test": unl["test"]}})):
        cfg = config.from_dict({**demo, **over, "output_dir": str(out / name)}, f"demo config ({name} labels)")
        t = time.perf_counter()
        libs[name] = train_library(cfg, out / name)
        print(f"{name}: trained in {time.perf_counter() - t:.0f} s", flush=True)
    test = {t: d.test[:16] for t, d in load_demo().items()}
    ppl: dict[str, dict[str, float]] = {}
    for name, root in libs.items():
        engine = Engine.load(root)
        for task, records in test.items():
            routes = engine.routes_for([r.text for r in records], None)
            per = [record_nll(engine, [r], rt.adapter)[0] for r, rt in zip(records, routes)]
            ppl.setdefault(task, {})[f"chain ({name})"] = perplexity(*pooled(per))
            if name == "true":
                ppl[task]["mixed"] = perplexity(*pooled(record_nll(engine, records, "mixed")))
        del engine
    cols = ["chain (true)", "chain (discovered)", "mixed"]
    rows = ["| task | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows += [f"| {t} | " + " | ".join(f"{v[c]:.2f}" for c in cols) + " |" for t, v in ppl.items()]
    geo = {c: math.exp(sum(math.log(v[c]) for v in ppl.values()) / len(ppl)) for c in cols}
    rows.append("| geometric mean | " + " | ".join(f"{geo[c]:.2f}" for c in cols) + " |")
    rows.append(f"\ndiscovered / true (geometric mean): {geo['chain (discovered)'] / geo['chain (true)']:.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, help="also time discovery of this many distinct records")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--table", metavar="DIR", help="also train two demo libraries in DIR and print Table I")
    args = p.parse_args(argv)
    import torch

    from chainlora.inference.classifier import FrozenEncoder as Encoder

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    encoder = Encoder("minilm")
    rows = [] if args.skip_quality else quality(encoder)
    if args.scale:
        rows += [""] + scale(encoder, args.scale)
    if args.table:
        rows += [""] + table(args.table)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
