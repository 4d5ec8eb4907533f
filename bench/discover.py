"""Task discovery on unlabelled data: quality on the demo data, and speed / memory at scale.

    python bench/discover.py              # the demo's train and test splits, labels removed
    python bench/discover.py --scale 100000   # also: 100,000 distinct records, time and peak RSS

Quality: the adjusted Rand index (ARI) of `chainlora.discover.discover` against the true demo
tasks and the k it chose with no hint, per split and per-task slice (the whole split, and the
first N records a task), seed 0. Scale: the demo's 9,500 records made distinct (each record's
instruction and answer get a unique "(#i)" tag, so nothing is embedded once for many records)
and repeated to N; time per stage and peak resident memory of this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time

from sklearn.metrics import adjusted_rand_score


def quality(encoder) -> list[str]:
    from chainlora.data.records import demo_path, read_records
    from chainlora.discover import discover

    rows = ["| split | records a task | records | k chosen | ARI | seconds |", "|---|---|---|---|---|---|"]
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
            rows.append(f"| {split} | {per or 'all (' + str(len(sub) // len(by)) + ')'} | {len(sub)} | "
                        f"{found.summary['k']} | {ari:.3f} | {secs:.1f} |")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, help="also time discovery of this many distinct records")
    p.add_argument("--skip-quality", action="store_true")
    args = p.parse_args(argv)
    import torch

    from chainlora.inference.classifier import Encoder

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    encoder = Encoder("minilm")
    rows = [] if args.skip_quality else quality(encoder)
    if args.scale:
        rows += [""] + scale(encoder, args.scale)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
