"""Benchmark: the adapter pool's gather (advanced indexing vs index_select), alone and end to end.

The pool's hook gathers every row's A and B out of the slot tensors once per targeted Linear
per forward (60 times a decode step on SmolLM2-135M, q/v). Written `A[rows]` (advanced
indexing), that gather cost more than the two batched matmuls after it and, at a decode step,
about what the base Linear's matmul does; `index_select` does the same copy 4-6x faster. This
runs both hooks on ONE engine, alternating, and reports each mixed batch against the one-adapter batch of the same run (the
one-adapter path takes no gather, so it is the same code on both sides):

    one      N requests, all on one adapter
    mixed    N requests over K adapters in ONE batch
    --new-tokens each (forced: min_new_tokens), medians of --repeats, tokens/s

    .venv/bin/python bench/pool_gather.py --library runs/demo/library
    .venv/bin/python bench/pool_gather.py --micro     # the hook alone, one Linear, no library

`--micro` times one targeted Linear's work at a decode step (one token a row) with SmolLM2-135M's
shapes: the base matmul, the gather both ways, and the whole LoRA delta both ways.
Any library works; `--rank 8` zero-pads its adapters to rank 8 (same answers, a rank-8
adapter's cost) so a smaller-rank library stands in for the demo's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def legacy_hook(target, module, args, output):
    """The pool's hook as it was before (advanced indexing for the gather); else the same."""
    batch = target.pool.batch
    if batch is None or batch[1] is not None or target not in target.pool.batch_targets:
        return target.hook(module, args, output)
    x, rows = args[0].to(target.A.dtype), batch[0]
    r = target.pool.batch_rank
    A, B = target.A[rows, :r], target.B[rows, :, :r]
    delta = x.reshape(x.shape[0], -1, x.shape[-1]).bmm(A.transpose(1, 2)).bmm(B.transpose(1, 2))
    delta = delta * target.scale[rows].view(-1, 1, 1)
    return output + delta.view(*x.shape[:-1], -1).to(output.dtype)


def use(pool, hook) -> None:
    """Re-register every target's forward hook as `hook(target, module, args, output)`."""
    for t in pool.targets.values():
        t.handle.remove()
        t.handle = t.linear.register_forward_hook(functools.partial(hook, t))


def pad(lib: Path, rank: int) -> None:
    """Zero-pad every task adapter of `lib` to `rank` (alpha scaled to keep alpha / r): same
    logits, a rank-`rank` adapter's shapes."""
    import torch
    from safetensors.torch import load_file, save_file

    from chainlora import library

    manifest = json.loads((lib / library.MANIFEST).read_text())
    for task in manifest["tasks"]:
        d = lib / task["path"]
        cfg = json.loads((d / "adapter_config.json").read_text())
        r = cfg["r"]
        if r >= rank or cfg.get("use_rslora"):
            raise SystemExit(f"{d}: rank {r} (use_rslora {cfg.get('use_rslora')}); --rank pads plain LoRA up")
        tensors = {k: torch.cat([v, v.new_zeros(rank - r, v.shape[1])]) if "lora_A" in k else
                   torch.cat([v, v.new_zeros(v.shape[0], rank - r)], 1) for k, v in load_file(str(d / "adapter_model.safetensors")).items()}
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg.update(r=rank, lora_alpha=cfg["lora_alpha"] * rank / r)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        task["sha256"] = library.adapter_sha256(d)
    library.write_manifest(lib, manifest)


def micro(repeats: int, requests: list[int], adapters: list[int], rank: int = 8, slots: int = 33) -> None:
    """Microseconds a call for one Linear (q_proj 576x576, v_proj 576x192), one token a row."""
    import torch

    def us(fn, n: int = 200) -> float:
        for _ in range(20):
            fn()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - t0) / n * 1e6)
        return statistics.median(runs)

    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {slots} slots of rank {rank}; medians of {repeats}, us a call")
    print("\n| rows | adapters | Linear | base matmul | gather A[rows] | gather index_select | ratio "
          "| LoRA delta, A[rows] | LoRA delta, index_select | ratio |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in requests:
        for k in adapters:
            for name, out in (("q_proj", 576), ("v_proj", 192)):
                W, x = torch.randn(out, 576), torch.randn(n, 1, 576)
                A, B, s = torch.randn(slots, rank, 576), torch.randn(slots, out, rank), torch.rand(slots)
                rows = torch.tensor([1 + i % k for i in range(n)])

                def delta(a, b, sc):
                    return x.bmm(a.transpose(1, 2)).bmm(b.transpose(1, 2)) * sc.view(-1, 1, 1)

                t = {"base": us(lambda: x @ W.T),
                     "g_old": us(lambda: (A[rows, :rank], B[rows, :, :rank], s[rows])),
                     "g_new": us(lambda: (A.index_select(0, rows), B.index_select(0, rows), s.index_select(0, rows))),
                     "d_old": us(lambda: delta(A[rows, :rank], B[rows, :, :rank], s[rows])),
                     "d_new": us(lambda: delta(A.index_select(0, rows), B.index_select(0, rows), s.index_select(0, rows)))}
                print(f"| {n} | {k} | {name} | {t['base']:.0f} | {t['g_old']:.0f} | {t['g_new']:.0f} | "
                      f"{t['g_new'] / t['g_old']:.2f} | {t['d_old']:.0f} | {t['d_new']:.0f} | {t['d_new'] / t['d_old']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", default="runs/demo/library")
    ap.add_argument("--rank", type=int, help="zero-pad the adapters to this rank first")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--adapters", type=int, nargs="+", default=[8, 32], help="distinct adapters in a mixed batch")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--micro", action="store_true", help="only the hook's work for one Linear (no library)")
    args = ap.parse_args()
    if args.micro:
        return micro(args.repeats, args.requests, args.adapters)

    import torch
    from serve_memory import build

    from chainlora.data import load_demo
    from chainlora.inference.adapter_pool import _Target
    from chainlora.inference.engine import Engine

    lib = Path(tempfile.mkdtemp(prefix="chainlora-gather-")) / "lib"
    build(Path(args.library), lib, max(args.adapters))
    if args.rank:
        pad(lib, args.rank)
    engine = Engine.load(lib, device="cpu", adapters="pool", max_adapters=max(args.adapters))
    names = engine.tasks
    demo = load_demo()
    pool_texts = [r.text for t in demo for r in demo[t].test[:8]]
    hooks = {"index_select": _Target.hook, "A[rows]": legacy_hook}
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    rows = []
    for n in args.requests:
        texts = [pool_texts[i % len(pool_texts)] for i in range(n)]
        runs: dict = {}
        sides = [("one", 1, "index_select")] + [(f"{k} adapters", k, h) for k in args.adapters for h in hooks]
        for _, k, h in sides:  # warm: every adapter resident, every code path run once
            use(engine.pool, hooks[h])
            engine.generate(texts, task=[names[i % k] for i in range(n)], **kw)
        for _ in range(args.repeats):  # alternating: drift hits every side alike
            for side, k, h in sides:
                use(engine.pool, hooks[h])
                tasks = [names[i % k] for i in range(n)]
                t0 = time.perf_counter()
                engine.generate(texts, task=tasks, **kw)
                runs.setdefault((side, h), []).append(n * args.new_tokens / (time.perf_counter() - t0))
        med = {key: statistics.median(v) for key, v in runs.items()}
        one = med[("one", "index_select")]
        for (side, h), tok in med.items():
            rows.append((n, side, "—" if side == "one" else h, tok, tok / one, runs[(side, h)]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {max(args.adapters)} adapters of rank {engine.pool.r_max} "
          f"from {args.library}; {args.new_tokens} new tokens; medians of {args.repeats}")
    print("\n| requests | batch | gather | tok/s | / one-adapter batch | spread (min-max / one) |")
    print("|---:|---|---|---:|---:|---:|")
    for n, side, h, tok, ratio, v in rows:
        one = next(t for m, s, _, t, _, _ in rows if m == n and s == "one")
        print(f"| {n} | {side} | {h} | {tok:.1f} | {ratio:.3f} | {min(v) / one:.3f}-{max(v) / one:.3f} |")


if __name__ == "__main__":
    main()
