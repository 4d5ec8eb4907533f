"""llama.cpp (llama-cpp-python) against chainlora's engine on the same prompts and adapter.

    python bench/llamacpp.py --library runs/demo/library [--per-task 4] [--new-tokens 16] [--rounds 3]

Exports the library three times (`--format gguf` with the base as F32, Q8_0 and the source Q4_1),
then, alternating the systems round by round in this one process (torch and llama.cpp each on
2 threads): tokens/s of greedy generation of exactly --new-tokens tokens for the demo's test
prompts (per-task a task) under the mixed adapter — llama.cpp one prompt at a time (llama-cpp-
python runs one sequence), chainlora one at a time and as one batch. Answer agreement of the
Q8_0 and Q4_1 bases with the F32 base (greedy answers to the end token, same adapter, same ids).
Needs llama-cpp-python (`make llamacpp-check` installs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def llama_generate(llm, ids: list[int], n: int, ends: set[int] | None) -> list[int]:
    """Greedy ids: exactly n tokens (ends=None), or up to the first end token."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if ends is not None and nxt in ends:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", default="runs/demo/library")
    p.add_argument("--per-task", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    import torch
    from llama_cpp import Llama, __version__ as llama_version

    from chainlora.data.prompts import ids as token_ids
    from chainlora.data.records import load_demo
    from chainlora.inference.engine import Engine, Route
    from chainlora.inference.stops import end_ids
    from chainlora.library.export import export

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="chainlora-llamacpp-bench-"))
    bases = {}
    for dtype in ("f32", "q8_0", "source"):
        export(args.library, work / dtype, "gguf", base_dtype=dtype)
        bases["q4_1 (source)" if dtype == "source" else dtype] = work / dtype
    engine = Engine.load(args.library)
    tok, ends = engine.tok, set(end_ids(engine.tok))
    demo = load_demo()
    texts = [r.text for t in engine.tasks for r in demo[t].test[:args.per_task]]
    ids = [token_ids(tok, engine.render([x])[0]) for x in texts]
    mixed = [Route(task=None, probability=1.0, adapter="mixed")]
    llms = {name: Llama(model_path=str(d / "base.gguf"), lora_path=str(d / "adapters" / "mixed.gguf"),
                        n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0) for name, d in bases.items()}
    n = args.new_tokens

    def run_llama(name: str) -> float:
        t = time.perf_counter()
        for x in ids:
            llama_generate(llms[name], x, n, None)
        return len(ids) * n / (time.perf_counter() - t)

    def run_engine(batch: bool) -> float:
        t = time.perf_counter()
        groups = [texts] if batch else [[x] for x in texts]
        for g in groups:
            engine.generate(g, routes=mixed * len(g), max_new_tokens=n, min_new_tokens=n, temperature=0.0)
        return len(texts) * n / (time.perf_counter() - t)

    systems = {f"llama.cpp {b}": (lambda b=b: run_llama(b)) for b in bases}
    systems["chainlora engine, one at a time"] = lambda: run_engine(False)
    systems["chainlora engine, one batch"] = lambda: run_engine(True)
    rates: dict[str, list[float]] = {s: [] for s in systems}
    order = list(systems)
    for r in range(args.rounds):
        for s in order[r % len(order):] + order[:r % len(order)]:  # a different system first each round
            rates[s].append(systems[s]())
            print(f"round {r + 1}: {s}: {rates[s][-1]:.1f} tokens/s", flush=True)
    answers = {b: [tok.decode(llama_generate(llms[b], x, n, ends), skip_special_tokens=True).strip() for x in ids]
               for b in bases}
    ref = answers["f32"]
    result = {"llama_cpp_python": llama_version, "prompts": len(ids), "new_tokens": n, "adapter": "mixed",
              "tokens_per_s_median": {s: round(statistics.median(v), 1) for s, v in rates.items()},
              "tokens_per_s_runs": {s: [round(x, 1) for x in v] for s, v in rates.items()},
              "agreement_with_f32": {b: round(sum(a == c for a, c in zip(answers[b], ref)) / len(ref), 4)
                                     for b in bases if b != "f32"}}
    base = result["tokens_per_s_median"]["chainlora engine, one at a time"]
    result["ratio_to_chainlora_one_at_a_time"] = {s: round(v / base, 3) for s, v in result["tokens_per_s_median"].items()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
