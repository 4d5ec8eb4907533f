"""Benchmark the inference engine on a trained library (default: the demo library).

P1  routed answer latency / answer latency with the adapter pre-chosen (64 new tokens, one
    instruction at a time), for the library's default routing and every selector it has.
P2  16 instructions spread over 8 adapters in ONE mixed batch: tokens/s relative to the same
    16 instructions all on one adapter, and to answering task by task (8 calls).
P3  warm adapter switch (cache hit) vs PEFT's `set_adapter`; cold load from disk vs the raw
    read of the adapter file, and vs PEFT's `load_adapter` + `set_adapter`; the same cold load
    into the adapter pool (its tensors copied into a free slot).
P4  16 and 64 requests over 1 / 8 / 32 distinct adapters (a 32-adapter library built from the
    demo's, see serve_memory.build): the adapter pool vs PEFT `adapter_names` vs the base model
    without adapters, tokens/s; each tier's mixed batch against its own one-adapter batch.

All sides run in one process, alternating; answers are forced to equal length
(min_new_tokens) so every side does the same work. Medians are compared.

    .venv/bin/python bench/engine.py [--library runs/demo/library] [--repeats 3] [--parts P1,P2,P3,P4]
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


def median_of(fn, repeats: int) -> float:
    return statistics.median(timed(fn) for _ in range(repeats))


def p1(engine, texts: list[str], repeats: int, n_new: int, only: list[str] | None = None) -> dict:
    """Routed vs pre-chosen, same adapter (the routed one), same forced length. The library's
    default routing (its selector, threshold and out-of-library detector) routes inside
    `generate`, as a request does; every other selector is timed as route + pinned answer."""
    from chainlora.inference import selectors

    out = {}
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new)
    for selector in [s for s in ["default"] + selectors.available(engine.lib) if not only or s in only]:
        routed, pinned = [], []
        for text in texts:
            if selector == "default":
                (route,) = engine.route([text])
                run = lambda: engine.generate([text], **kw)  # noqa: E731
            else:
                (route,) = engine.route([text], selector=selector)
                run = lambda: (engine.route([text], selector=selector),  # noqa: E731
                               engine.generate([text], task=route.adapter, **kw))
            pinned_run = lambda: engine.generate([text], task=route.adapter, **kw)  # noqa: E731
            for _ in range(repeats):  # alternating, so drift hits both sides alike
                routed.append(timed(run))
                pinned.append(timed(pinned_run))
        name = f"default: `{engine.selector}` + detector" if selector == "default" else f"selector `{selector}`"
        out[name] = (statistics.median(routed), statistics.median(pinned))
    return out


def p2(engine, texts: list[str], tasks: list[str], repeats: int, n_new: int) -> dict:
    """Mixed batch over 8 adapters vs one adapter vs task by task; tokens/s."""
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new)
    n_tokens = len(texts) * n_new
    engine.generate(texts, task=tasks, **kw)  # warm: every adapter resident

    def by_task() -> None:
        for t in dict.fromkeys(tasks):
            idx = [i for i, x in enumerate(tasks) if x == t]
            engine.generate([texts[i] for i in idx], task=t, **kw)

    mixed, one, sequential = [], [], []
    for _ in range(repeats):
        mixed.append(n_tokens / timed(lambda: engine.generate(texts, task=tasks, **kw)))
        one.append(n_tokens / timed(lambda: engine.generate(texts, task=tasks[0], **kw)))
        sequential.append(n_tokens / timed(by_task))
    return {"mixed": statistics.median(mixed), "one": statistics.median(one),
            "by_task": statistics.median(sequential)}


def p3(engine, lib_path: Path, names: list[str], repeats: int) -> dict:
    """Warm switch and cold loads (new slot / recycled slot), against the raw file read and
    PEFT's own calls."""
    cache = engine.cache
    cache.acquire(names[:2])
    warm = median_of(lambda: cache.acquire([names[0]]), 200)
    peft_switch = median_of(lambda: cache.model.set_adapter(cache.slot(names[1])), repeats * 5)

    def forget(name: str) -> None:
        """Out of the device and the CPU tier: the next acquire reads the disk."""
        if name in cache.resident:
            cache.model.delete_adapter(cache.slot_of.pop(name))
            del cache.resident[name]
        cache.cpu.pop(name, None)

    def cold_new(name: str) -> float:
        forget(name)
        cache.device_bytes = 1 << 40  # room for it: a new slot is injected
        return timed(lambda: cache.acquire([name]))

    def cold_recycled(name: str) -> float:
        forget(name)
        cache.device_bytes = sum(cache.resident.values())  # full: the LRU adapter's slot is reused
        return timed(lambda: cache.acquire([name]))

    entry = {e["name"]: e for e in engine.lib.entries()}
    weights = [lib_path / entry[n]["path"] / "adapter_model.safetensors" for n in names]
    raw = statistics.median(timed(lambda: w.read_bytes()) for w in weights for _ in range(repeats))
    new = statistics.median(cold_new(n) for n in names for _ in range(repeats))
    swaps = cache.stats.hotswaps
    recycled = statistics.median(cold_recycled(n) for n in names for _ in range(repeats))
    assert cache.stats.hotswaps > swaps, "recycled loads did not hotswap"
    cache.device_bytes = 1 << 40

    def peft_load(name: str) -> float:
        tmp = f"peft-{name}"
        t = timed(lambda: (cache.model.load_adapter(str(lib_path / entry[name]["path"]), adapter_name=tmp),
                           cache.model.set_adapter(tmp)))
        cache.model.delete_adapter(tmp)
        return t

    pefts = [peft_load(n) for n in names for _ in range(repeats)]
    return {"warm": warm, "peft_switch": peft_switch, "cold": new, "recycled": recycled, "raw": raw,
            "peft_load": statistics.median(pefts), "bytes": weights[0].stat().st_size,
            "pool": pool_cold(lib_path, names, repeats)}


def pool_cold(lib_path: Path, names: list[str], repeats: int) -> float:
    """Cold load into the adapter pool: out of its slot and the CPU tier, then acquire (disk
    read with the sha256 check, parse, copy into the slot)."""
    from chainlora.inference.engine import Engine

    engine = Engine.load(lib_path, device="cpu", adapters="pool", max_adapters=len(names))
    pool = engine.pool
    pool.acquire(names)  # targets resolved, slots allocated: what a running server has

    def cold(name: str) -> float:
        pool.drop({name})
        engine.cache.cpu.pop(name, None)
        return timed(lambda: pool.acquire([name]))

    return statistics.median(cold(n) for n in names for _ in range(repeats))


def p4(src: Path, texts: list[str], repeats: int, n_new: int, sizes: tuple[int, ...] = (16, 64)) -> dict:
    """Tokens/s of pool, PEFT and the bare base model for N requests over K adapters."""
    import tempfile

    from serve_memory import build

    from chainlora.inference.engine import BASE, Engine, Route

    tmp = Path(tempfile.mkdtemp(prefix="chainlora-p4-"))
    build(src, tmp / "lib", 32)
    tiers = {t: Engine.load(tmp / "lib", device="cpu", adapters=t, max_adapters=32) for t in ("pool", "peft")}
    names = tiers["pool"].tasks
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new)
    out: dict = {}
    for n in sizes:
        batch = [texts[i % len(texts)] for i in range(n)]
        for tier in tiers.values():  # warm: every adapter resident, every code path compiled
            tier.generate(batch, task=[names[i % 32] for i in range(n)], **kw)
        runs: dict = {}
        for _ in range(repeats):  # alternating: drift hits every side alike
            for k in (1, 8, 32):
                tasks = [names[i % k] for i in range(n)]
                for t, engine in tiers.items():
                    runs.setdefault((t, k), []).append(n * n_new / timed(lambda: engine.generate(batch, task=tasks, **kw)))
            base = tiers["pool"]  # rows without an adapter: its hooks return at once, the bare base model
            routes = [Route(None, 1.0, adapter=BASE, selector="pinned")] * n
            runs.setdefault(("base", 0), []).append(n * n_new / timed(lambda: base.generate(batch, routes=routes, **kw)))
        out[n] = {key: statistics.median(v) for key, v in runs.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default="runs/demo/library")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--p4-requests", default="16,64", help="P4's batch sizes, e.g. 64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--parts", default="P1,P2,P3,P4", help="which parts to run, e.g. P1")
    parser.add_argument("--p1-selectors", help="P1 for these only, e.g. default,encoder (default: all)")
    args = parser.parse_args()
    parts = set(args.parts.upper().split(","))

    import torch

    from chainlora.data import load_demo
    from chainlora.inference.engine import Engine

    engine = Engine.load(args.library, device="cpu")
    demo = load_demo()
    tasks = engine.tasks
    one_each = [demo[t].test[0].text for t in tasks]
    eight = tasks[:8]
    texts16 = [demo[t].test[i].text for t in eight for i in (1, 2)]
    tasks16 = [t for t in eight for _ in (1, 2)]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"library {args.library} ({len(tasks)} task adapters); medians of {args.repeats}")
    if "P1" in parts:
        only = args.p1_selectors.split(",") if args.p1_selectors else None
        report_p1(p1(engine, one_each[:5], args.repeats, args.new_tokens, only))
    if "P2" in parts:
        report_p2(p2(engine, texts16, tasks16, args.repeats, 32))
    if "P3" in parts:
        report_p3(p3(engine, Path(args.library), tasks[:4], args.repeats))
    if "P4" in parts:
        del engine
        report_p4(p4(Path(args.library), [demo[t].test[i].text for t in tasks for i in range(7)], args.repeats, 16,
                      tuple(int(n) for n in args.p4_requests.split(","))), 16)


def report_p1(r1: dict) -> None:
    print("\n| P1: routed / pre-chosen latency, 64 new tokens | routed s | pre-chosen s | ratio |")
    print("|---|---|---|---|")
    for sel, (routed, pinned) in r1.items():
        print(f"| {sel} | {routed:.3f} | {pinned:.3f} | {routed / pinned:.3f} |")


def report_p2(r2: dict) -> None:
    print("\n| P2: 16 instructions, 32 new tokens each | tokens/s | ratio to one adapter |")
    print("|---|---|---|")
    print(f"| 16 on one adapter, one batch (baseline) | {r2['one']:.1f} | 1.00 |")
    print(f"| 16 over 8 adapters, ONE mixed batch | {r2['mixed']:.1f} | {r2['mixed'] / r2['one']:.3f} |")
    print(f"| 16 over 8 adapters, task by task (8 calls) | {r2['by_task']:.1f} | {r2['by_task'] / r2['one']:.3f} |")


def report_p3(r3: dict) -> None:
    print(f"\n| P3: adapter switching and loading ({r3['bytes'] / 1e6:.2f} MB adapter) | ms | ratio |")
    print("|---|---|---|")
    print(f"| warm switch: cache hit | {r3['warm'] * 1e3:.4f} | - |")
    print(f"| PEFT set_adapter | {r3['peft_switch'] * 1e3:.2f} | {r3['peft_switch'] / max(r3['warm'], 1e-9):.0f}x the hit |")
    print(f"| raw read of adapter_model.safetensors (baseline) | {r3['raw'] * 1e3:.2f} | 1.00 |")
    print(f"| cold load from disk, new slot (LoRA modules injected) | {r3['cold'] * 1e3:.2f} | {r3['cold'] / r3['raw']:.2f} |")
    print(f"| cold load from disk, recycled slot (weights hotswapped in) | {r3['recycled'] * 1e3:.2f} | {r3['recycled'] / r3['raw']:.2f} |")
    print(f"| PEFT load_adapter + set_adapter | {r3['peft_load'] * 1e3:.2f} | {r3['peft_load'] / r3['raw']:.2f} |")
    print(f"| cold load from disk into the adapter pool (copied into a slot) | {r3['pool'] * 1e3:.2f} | {r3['pool'] / r3['raw']:.2f} |")


def report_p4(r4: dict, n_new: int) -> None:
    print(f"\n| P4: N requests, {n_new} new tokens each | adapters | pool tok/s | PEFT tok/s | base tok/s "
          "| pool / its 1-adapter | PEFT / its 1-adapter | pool / PEFT | pool / base |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in r4.items():
        base = r[("base", 0)]
        for k in (1, 8, 32):
            pool, peft = r[("pool", k)], r[("peft", k)]
            print(f"| {n} | {k} | {pool:.1f} | {peft:.1f} | {base:.1f} | {pool / r[('pool', 1)]:.3f} "
                  f"| {peft / r[('peft', 1)]:.3f} | {pool / peft:.3f} | {pool / base:.3f} |")


if __name__ == "__main__":
    main()
