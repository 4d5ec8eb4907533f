"""Benchmark P5: server memory with 100 adapters in the library and a cache of 8.

Builds a 100-adapter library from the demo library (variants of its ten task adapters: B scaled
by 1 + i/1000, so every adapter has its own weights and sha256), starts `chainlora serve` on it
in a subprocess with `--max-adapters 8 --cpu-cache-mb 0 --adapters pool` (`--tier peft` for PEFT), and reads the server's RSS
(/proc/PID/status VmRSS):

    RSS_1    after answering with ONE adapter (base model + one adapter + server)
    RSS_100  after answering with all 100 adapters, twice round, 8 clients at a time
    bound    (RSS_1 + 7 adapters' bytes) x 1.10  — base + 8 adapters + 10%

    .venv/bin/python bench/serve_memory.py [--library runs/demo/library] [--adapters 100] [--cache 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def build(src: Path, dst: Path, n: int) -> int:
    """A library of n task adapters made from src's; returns one adapter's weight bytes."""
    from safetensors.torch import load_file, save_file

    from chainlora import library

    manifest = json.loads((src / library.MANIFEST).read_text())
    originals = manifest["tasks"]
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    tasks = []
    for i in range(n):
        orig = originals[i % len(originals)]
        name, out = f"task{i:03d}", dst / f"tasks/task{i:03d}"
        out.mkdir(parents=True)
        tensors = load_file(str(src / orig["path"] / "adapter_model.safetensors"))
        save_file({k: v * (1 + i / 1000) if "lora_B" in k else v for k, v in tensors.items()},
                  str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copy(src / orig["path"] / "adapter_config.json", out / "adapter_config.json")
        tasks.append({**orig, "name": name, "label": name, "path": f"tasks/{name}",
                      "sha256": library.adapter_sha256(out)})
    manifest.update(tasks=tasks, router=None, mixed=None, classifier=None)
    library.write_manifest(dst, manifest)
    return (dst / "tasks/task000/adapter_model.safetensors").stat().st_size


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def ask(url: str, models: list[str], concurrency: int) -> int:
    from openai import AsyncOpenAI

    c = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)
    errors = 0

    async def one(model: str) -> None:
        nonlocal errors
        async with gate:
            try:
                await c.completions.create(model=model, prompt="Give the antonym of the word hot.", max_tokens=4)
            except Exception:
                errors += 1

    await asyncio.gather(*(one(m) for m in models))
    await c.close()
    return errors


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", type=Path, default=Path("runs/demo/library"))
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--cache", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/bench-serve-memory"))
    p.add_argument("--tier", default="pool", choices=["pool", "peft"], help="serve --adapters (device tier)")
    args = p.parse_args()
    if not (args.library / "chainlora.json").is_file():
        print(f"{args.library}: no library; run `chainlora demo` first", file=sys.stderr)
        return 2
    lib = args.out / "lib"
    adapter_bytes = build(args.library, lib, args.adapters)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    exe = Path(sys.executable).with_name("chainlora")
    server = subprocess.Popen([str(exe), "serve", str(lib), "--port", str(port), "--device", "cpu",
                               "--max-adapters", str(args.cache), "--cpu-cache-mb", "0", "--adapters", args.tier],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(server.stderr.read(), file=sys.stderr)
                return 1
            time.sleep(0.5)
        names = [f"task{i:03d}" for i in range(args.adapters)]
        errors = asyncio.run(ask(url, names[:1] * 4, 1))
        rss_1 = rss_mb(server.pid)
        t0 = time.monotonic()
        errors += asyncio.run(ask(url, names * 2, args.cache))
        seconds = time.monotonic() - t0
        rss_100 = rss_mb(server.pid)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        server.terminate()
        server.wait(timeout=30)
    stats = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("chainlora_adapter") and not line.startswith("#")}
    adapter_mb = adapter_bytes / (1 << 20)
    bound = (rss_1 + (args.cache - 1) * adapter_mb) * 1.10
    print(f"adapters: {args.adapters} in the library, cache {args.cache} (--cpu-cache-mb 0); "
          f"one adapter {adapter_mb:.2f} MB")
    print(f"RSS_1   {rss_1:8.1f} MB  (base model + 1 adapter + server)")
    print(f"RSS_100 {rss_100:8.1f} MB  after {2 * args.adapters} requests over all adapters "
          f"({seconds:.1f} s, {errors} errors)")
    print(f"bound   {bound:8.1f} MB  (RSS_1 + {args.cache - 1} adapters) x 1.10 -> "
          f"RSS_100 / (RSS_1 + {args.cache - 1} adapters) = {rss_100 / (bound / 1.10):.3f} "
          f"({'met' if rss_100 <= bound else 'MISSED'})")
    print("cache: " + ", ".join(f"{k.removeprefix('chainlora_adapter_cache_').removesuffix('_total')} {v:.0f}"
                                for k, v in stats.items()))
    return 0 if rss_100 <= bound and errors == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
