"""Benchmark: the adapter pool's slots sized to the library's largest rank vs the fixed rank 8
they had before, on a library whose adapters are smaller (rank 4 and below).

With rank-8 slots a rank-4 adapter's B fills half of each slot's columns: a cold load copies it
shaped (strided), and every forward multiplies the zero padding too. Sized to the library, B
fills the slot, the file is read straight into it, and the LoRA products are half as wide.

Two engines on the same library in one process, alternating, medians of --repeats:
    cold load  an adapter out of its slot and the CPU tier, then acquired (disk read, copy)
    mixed      N requests over K adapters in ONE batch, --new-tokens each, tokens/s

    .venv/bin/python bench/pool_rank.py --library runs/bench-capacity-40/r4-s1/none

Any library of rank < 8 adapters will do (`python bench/capacity.py --regime 40 --ranks 4
--seeds 1 --systems none` builds the one above).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def engines(library: Path, slots: int) -> dict:
    """{"fixed 8": an engine whose pool has the old rank-8 slots, "library": the current one}."""
    from chainlora.inference.adapter_pool import AdapterPool
    from chainlora.inference.engine import Engine

    out = {name: Engine.load(library, device="cpu", adapters="pool", max_adapters=slots)
           for name in ("fixed 8", "library")}
    old = out["fixed 8"]
    old.pool.remove()  # nothing loaded yet: swap in the pool as it was built before (rank 8)
    old.pool = AdapterPool(old.base.model, old.cache.stage, slots=slots, rank=8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", required=True, help="a library whose adapters have rank < 8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters in the mixed batch")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()

    import torch

    from chainlora.data import load_demo

    tiers = engines(Path(args.library), args.adapters + 1)
    names = tiers["library"].tasks[:args.adapters]
    demo = load_demo()
    texts = [demo[t].test[i].text for t in names for i in range(args.requests)][:args.requests]
    tasks = [names[i % len(names)] for i in range(args.requests)]
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    for e in tiers.values():  # warm: every adapter resident, every code path run once
        e.generate(texts, task=tasks, **kw)

    def cold(e, name: str) -> float:
        e.pool.drop({name})
        e.cache.cpu.pop(name, None)
        return timed(lambda: e.pool.acquire([name]))

    loads: dict = {k: [] for k in tiers}
    speed: dict = {k: [] for k in tiers}
    for _ in range(args.repeats):  # alternating: drift hits both sides alike
        for k, e in tiers.items():
            loads[k] += [cold(e, n) for n in names]
            speed[k].append(args.requests * args.new_tokens / timed(lambda: e.generate(texts, task=tasks, **kw)))
    r = {k: tiers[k].pool.r_max for k in tiers}
    load = {k: statistics.median(v) * 1e3 for k, v in loads.items()}
    tok = {k: statistics.median(v) for k, v in speed.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; library {args.library}; medians of {args.repeats}")
    print(f"\n| pool slots | r_max | cold load, ms | {args.requests} requests over {args.adapters} adapters, tok/s |")
    print("|---|---:|---:|---:|")
    for k in tiers:
        print(f"| {k} | {r[k]} | {load[k]:.2f} | {tok[k]:.1f} |")
    print(f"| library / fixed 8 | | {load['library'] / load['fixed 8']:.3f} | {tok['library'] / tok['fixed 8']:.3f} |")


if __name__ == "__main__":
    main()
