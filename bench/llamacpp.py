"""llama.cpp (llama-cpp-python) against chainlora's engine on the same prompts and adapter.

    python bench/llamacpp.py --library runs/demo/library [--per-task 4] [--new-tokens 16] [--rounds 3]

Exports the library three times (`--format gguf` with the base as F32, Q8_0 and the source Q4_1),
then, alternating the systems round by round in this one process (torch and llama.cpp each on
2 threads): tokens/s of greedy generation of exactly --new-tokens tokens for the demo's test
prompts (per-task a task) under the mixed adapter — llama.cpp one prompt at a time (llama-cpp-
python runs one sequence), chainlora one at a time and as one batch. Answer agreement of the
Q8_0 and Q4_1 bases with the F32 base (greedy answers to the end token, same adapter, same ids).
Needs llama-cpp-python (`make llamacpp-check` installs it).

With --llama-server PATH (a llama-server binary, 4 slots): the cost of mixing adapters. The
same 40 prompts sent at once (16 tokens each, end token ignored) (a) all under the mixed
adapter, (b) each under its own task adapter; llama-server batches requests across slots
only when their adapter settings match. Against it, chainlora's engine answering the 40 as
one batch under one adapter and under their ten task adapters (`adapter_names`).
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


def mixing_cost(llama_server: str, out: Path, engine, texts: list[str], tasks: list[str], ids: list[list[int]],
                n: int) -> dict:
    """tokens/s of llama-server and of chainlora's engine, one adapter for all vs one a task."""
    import asyncio
    import socket
    import subprocess

    import httpx

    from chainlora.inference.engine import Route

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    names = json.loads((out / "export.json").read_text())["adapters"]
    proc = subprocess.Popen([llama_server, "-m", "base.gguf", "--lora", ",".join(a["path"] for a in names.values()),
                             "--lora-init-without-apply", "--port", str(port), "-np", "4", "-c", "8192", "-t", "2"],
                            cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        lora_id = {Path(e["path"]).stem: e["id"] for e in httpx.get(f"{url}/lora-adapters").json()}

        async def burst(adapters: list[str]) -> float:
            async with httpx.AsyncClient(timeout=600) as client:
                async def one(x: list[int], a: str) -> None:
                    lora = [{"id": i, "scale": 1.0 if name == a else 0.0} for name, i in lora_id.items()]
                    r = await client.post(f"{url}/v1/completions", json={
                        "prompt": x, "max_tokens": n, "temperature": 0, "ignore_eos": True, "lora": lora,
                        "cache_prompt": False})
                    r.raise_for_status()
                t = time.perf_counter()
                await asyncio.gather(*(one(x, a) for x, a in zip(ids, adapters)))
                return len(ids) * n / (time.perf_counter() - t)

        def chainlora(adapters: list[str]) -> float:
            routes = [Route(task=a, probability=1.0, adapter=a) for a in adapters]
            t = time.perf_counter()
            engine.generate(texts, routes=routes, max_new_tokens=n, min_new_tokens=n, temperature=0.0)
            return len(texts) * n / (time.perf_counter() - t)

        runs: dict[str, list[float]] = {k: [] for k in ("llama-server, one adapter", "llama-server, one a task",
                                                          "chainlora, one adapter", "chainlora, one a task")}
        for _ in range(3):
            runs["llama-server, one adapter"].append(asyncio.run(burst(["mixed"] * len(ids))))
            runs["llama-server, one a task"].append(asyncio.run(burst(tasks)))
            runs["chainlora, one adapter"].append(chainlora(["mixed"] * len(ids)))
            runs["chainlora, one a task"].append(chainlora(tasks))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    med = {k: round(statistics.median(v), 1) for k, v in runs.items()}
    return {"tokens_per_s_median": med, "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
            "mixing_cost": {"llama-server": round(med["llama-server, one a task"] / med["llama-server, one adapter"], 3),
                            "chainlora": round(med["chainlora, one a task"] / med["chainlora, one adapter"], 3)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", default="runs/demo/library")
    p.add_argument("--per-task", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--llama-server", help="a llama-server binary: also measure the cost of mixing adapters")
    p.add_argument("--only-mixing", action="store_true", help="with --llama-server: skip the llama-cpp-python part")
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
    if args.llama_server:
        tasks = [t for t in engine.tasks for _ in demo[t].test[:args.per_task]]
        mixing = mixing_cost(args.llama_server, bases["f32"], engine, texts, tasks, ids, args.new_tokens)
        print(json.dumps({"adapter_mixing": mixing}, indent=2), flush=True)
        if args.only_mixing:
            return 0
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
