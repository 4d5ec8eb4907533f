"""Benchmark: loading the default model from chainlora's cache vs dequantising the GGUF.

Baseline (same process): transformers' own GGUF loader on the shipped .gguf, which is what a
user without chainlora would run every time. Measured: chainlora's one-off conversion into an
empty cache, then its cached loads. Reported as ratios to the baseline, plus absolute seconds.

    .venv/bin/python bench/load_base.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chainlora.base_model import ALIASES, DEFAULT_MODEL, alias_gguf, load_base

    gguf = alias_gguf(ALIASES[DEFAULT_MODEL])

    def gguf_load() -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    load_base(DEFAULT_MODEL)  # warm imports and lazy modules so they are not billed to either side
    baseline = [timed(gguf_load) for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory() as home:
        os.environ["CHAINLORA_HOME"] = home
        first = timed(lambda: load_base(DEFAULT_MODEL))
        cached = [timed(lambda: load_base(DEFAULT_MODEL)) for _ in range(args.repeats)]
    b, c = statistics.median(baseline), statistics.median(cached)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| what | seconds (median) | ratio to GGUF load |")
    print("|---|---|---|")
    print(f"| transformers GGUF load (baseline) | {b:.2f} | 1.00 |")
    print(f"| chainlora first load (convert + cache) | {first:.2f} | {first / b:.2f} |")
    print(f"| chainlora cached load | {c:.2f} | {c / b:.3f} |")


if __name__ == "__main__":
    main()
