"""Serving under load: Poisson request-rate sweeps by GuideLLM against chainlora and llama-server.

    make bench-load              # = python bench/serve_load.py --llama-server PATH
    python bench/serve_load.py --library runs/demo/library --llama-server PATH \
        [--rates 0.5 1 2 3 4] [--seconds 30] [--output-tokens 16] [--systems pool peft ...]
    python bench/serve_load.py --render        # tables + plot from bench/serve-load.jsonl

The load comes from GuideLLM (the vLLM project's load tester, `chainlora[load]`), not from code
written here: Poisson arrivals at each rate for --seconds, prompts drawn from the demo's test
split across all ten tasks (shuffled, the same file and the same arrival seed for every system),
streamed chat completions of exactly --output-tokens tokens (`ignore_eos`, as load tools send).
Traffic `chain`: model "chain", each prompt routed to its task's adapter (ten adapters in play);
`pinned`: the same prompts, model = one task (one adapter). Systems, each started, warmed up,
swept and stopped in turn, in one invocation on one machine (2 threads each):
  pool              chainlora serve LIB (the adapter pool: mixed-adapter batches)
  peft              chainlora serve LIB --adapters peft
  llamacpp-f32      llama-server (F32 base, every adapter from `chainlora export --format gguf`,
                    applied per request) behind chainlora serve --backend llamacpp (routing)
  llamacpp-q8       the same with a Q8_0 base
  llama-server-f32  llama-server alone with the pinned adapter applied to every request
  llamacpp-f32-nocache  llamacpp-f32 without --backend-cache-prompt: what llama-server's prompt
                    cache buys (the others keep it: cache_prompt on, RAM cache off, docs/serving.md)
GuideLLM runs one worker process: 0.8.1's Poisson schedule is wrong with several (each process
restarts the arrival clock, and every request goes out at once); one async worker holds any
concurrency these rates need. Each (system, traffic, rate) becomes a row of bench/serve-load.jsonl
(TTFT / ITL / end-to-end p50/p90/p99, output tokens/s, completed / cut / failed requests).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from llamaserver_check import free_port, wait_for  # noqa: E402  (the same helpers as the llama-server check)
RESULTS = ROOT / "bench" / "serve-load.jsonl"
PLOT = ROOT / "bench" / "serve_load.png"
SYSTEMS = ("pool", "peft", "llamacpp-f32", "llamacpp-q8", "llama-server-f32", "llamacpp-f32-nocache")
TTFT_GOAL_S = 2.0  # the sustainable-rate bound on p99 TTFT


@contextmanager
def process(cmd: list[str], log: Path, health: str, env: dict | None = None, cwd: Path | None = None) -> Iterator[None]:
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd, env={**os.environ, **(env or {})})
    try:
        wait_for(health, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def chainlora(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("chainlora")), "serve", *args]


@contextmanager
def system(name: str, library: str, exports: dict[str, Path], llama_server: str, pinned: str,
           work: Path) -> Iterator[str]:
    """Start one system; yields the URL GuideLLM sends to."""
    port, torch2 = free_port(), {"OMP_NUM_THREADS": "2"}
    if name in ("pool", "peft"):
        with process(chainlora(library, "--port", str(port), *(["--adapters", "peft"] if name == "peft" else [])),
                     work / f"{name}.log", f"http://127.0.0.1:{port}/health", torch2):
            yield f"http://127.0.0.1:{port}"
        return
    out = exports["q8_0" if "q8" in name else "f32"]
    adapters = json.loads((out / "export.json").read_text())["adapters"]
    lport = free_port()
    if name == "llama-server-f32":  # alone: the pinned adapter on every request (scale 1 from the start)
        lora = ["--lora", adapters[pinned]["path"]]
    else:
        lora = ["--lora", ",".join(a["path"] for a in adapters.values()), "--lora-init-without-apply"]
    server = [llama_server, "-m", "base.gguf", *lora, "--port", str(lport), "-np", "4", "-c", "8192", "-t", "2",
              "--cache-ram", "0"]
    with process(server, work / f"{name}-llama-server.log", f"http://127.0.0.1:{lport}/health", cwd=out):
        if name == "llama-server-f32":
            yield f"http://127.0.0.1:{lport}"
            return
        cache = [] if name.endswith("nocache") else ["--backend-cache-prompt"]
        front = chainlora(library, "--port", str(port), "--backend", "llamacpp", "--backend-url",
                          f"http://127.0.0.1:{lport}", *cache)
        with process(front, work / f"{name}.log", f"http://127.0.0.1:{port}/health", {"OMP_NUM_THREADS": "1"}):
            yield f"http://127.0.0.1:{port}"


def write_prompts(path: Path, output_tokens: int) -> int:
    """Every demo test prompt of every task, shuffled (seed 0), each asking for output_tokens."""
    from chainlora.data.records import load_demo

    demo = load_demo()
    rows = [{"prompt": r.text, "output_tokens_count": output_tokens} for t in sorted(demo) for r in demo[t].test]
    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def write_rendered(path: Path, data: Path, library: str) -> None:
    """The same prompts in the library's chat template, as chainlora renders them, for llama-server
    alone (/v1/completions): its own template rendering adds SmolLM2's default system prompt
    (42 tokens instead of 29), which chainlora's library prompt does not."""
    from chainlora.inference.engine import Engine

    engine = Engine.load(library, device="cpu")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rendered = engine.render([r["prompt"] for r in rows])
    path.write_text("".join(json.dumps({**r, "prompt": p}) + "\n" for r, p in zip(rows, rendered)))


def warm_up(url: str, model: str, n: int = 4) -> None:
    """A few requests first: the first batches pay for lazy loading, not for load."""
    for _ in range(n):
        httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "Write the antonym of the word below.\n\nhot"}],
            "max_tokens": 4, "temperature": 0}).raise_for_status()


def sweep(url: str, model: str, data: Path, rates: list[float], seconds: float, out: Path, log: Path,
          endpoint: str = "/v1/chat/completions") -> dict:
    """One GuideLLM run: a Poisson sweep over `rates`; its JSON report."""
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": url, "model": model, "request_format": endpoint,
                    "timeout": 600},
        "profile": {"kind": "poisson", "rate": rates},
        "data": [{"kind": "json_file", "path": str(data)}],
        "constraints": [{"kind": "max_duration", "seconds": seconds}],
        "outputs": [{"kind": "json", "path": str(out)}]}}
    spec = out.with_suffix(".scenario.json")
    spec.write_text(json.dumps(scenario, indent=1))
    guidellm = str(Path(sys.executable).with_name("guidellm"))
    with open(log, "w") as f:
        subprocess.run([guidellm, "run", "-c", str(spec), "--disable-progress"], stdout=f, stderr=subprocess.STDOUT,
                       cwd=out.parent, check=True, env={**os.environ, "GUIDELLM__MAX_WORKER_PROCESSES": "1"})
    return json.loads(out.read_text())


def _pct(metric: dict, scale: float = 1.0) -> dict:
    p = metric["successful"]["percentiles"] or {}
    return {q: round(p[q] * scale, 3) if q in p else None for q in ("p50", "p90", "p99")}


def rows_of(report: dict, system_: str, traffic: str, session: str) -> list[dict]:
    """One row a rate: latency percentiles (seconds), achieved rates, request counts."""
    out = []
    for b in report["benchmarks"]:
        m, secs = b["metrics"], b["duration"]
        totals = m["request_totals"]
        out.append({
            "session": session, "system": system_, "traffic": traffic, "rate": b["config"]["strategy"]["rate"],
            "seconds": round(secs, 1), "completed": totals["successful"], "cut": totals["incomplete"],
            "errors": totals["errored"], "completed_per_s": round(totals["successful"] / secs, 3),
            "output_tokens_per_s": round(m["output_token_count"]["successful"]["total_sum"] / secs, 2),
            "prompt_tokens_p50": _pct(m["prompt_token_count"])["p50"],
            "ttft_s": _pct(m["time_to_first_token_ms"], 1e-3), "itl_s": _pct(m["inter_token_latency_ms"], 1e-3),
            "e2e_s": _pct(m["request_latency"])})
    return out


def run(args: argparse.Namespace) -> None:
    from chainlora.library.export import export

    found = shutil.which(args.llama_server)  # a name on PATH, or a path (kept relative by which)
    if found is None:
        raise SystemExit(f"error: --llama-server {args.llama_server}: not found (make llama-server builds it)")
    args.llama_server = str(Path(found).resolve())  # absolute: llama-server runs in the export's folder
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    exports = {}
    for dtype in ("f32", "q8_0"):
        if any(s.startswith("llama") and (("q8" in s) == (dtype == "q8_0")) for s in args.systems):
            exports[dtype] = Path(tempfile.mkdtemp(prefix=f"serve-load-{dtype}-"))
            export(args.library, exports[dtype], "gguf", base_dtype=dtype)
    data = work / "prompts.jsonl"
    n = write_prompts(data, args.output_tokens)
    if "llama-server-f32" in args.systems:
        write_rendered(work / "prompts-rendered.jsonl", data, args.library)
    session = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{n} prompts; rates {args.rates} req/s, {args.seconds:.0f} s each; session {session}", flush=True)
    for name in args.systems:
        traffics = ["pinned"] if name == "llama-server-f32" else args.traffic
        with system(name, args.library, exports, args.llama_server, args.pinned, work) as url:
            for traffic in traffics:
                model = "chain" if traffic == "chain" else args.pinned
                warm_up(url, model)
                t0 = time.monotonic()
                alone = name == "llama-server-f32"  # the prompt already in the chat template
                report = sweep(url, model, work / "prompts-rendered.jsonl" if alone else data, args.rates,
                               args.seconds, work / f"{name}-{traffic}.json", work / f"{name}-{traffic}.log",
                               "/v1/completions" if alone else "/v1/chat/completions")
                rows = rows_of(report, name, traffic, session)
                with open(args.results, "a") as f:
                    f.writelines(json.dumps({**r, "output_tokens": args.output_tokens}) + "\n" for r in rows)
                print(f"{name:17s} {traffic:6s} {time.monotonic() - t0:5.0f} s  " + "  ".join(
                    f"{r['rate']}:{r['ttft_s']['p99']}s/{r['output_tokens_per_s']}" for r in rows), flush=True)
    for path in exports.values():
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", default="runs/demo/library")
    p.add_argument("--llama-server", default="llama-server", help="llama-server binary")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1, 2, 3, 4], help="requests/s, Poisson")
    p.add_argument("--seconds", type=float, default=30, help="each rate's measured window")
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--traffic", nargs="+", choices=("chain", "pinned"), default=["chain", "pinned"])
    p.add_argument("--pinned", default="antonym", help="the task of pinned traffic")
    p.add_argument("--out", default="runs/bench-serve-load")
    p.add_argument("--results", type=Path, default=RESULTS, help="rows appended here (default bench/serve-load.jsonl)")
    p.add_argument("--render", action="store_true", help="only the tables and plot from the results")
    args = p.parse_args(argv)
    if not args.render:
        run(args)
    from serve_load_report import render  # bench/serve_load_report.py

    print(render(args.results, PLOT if args.results == RESULTS else args.results.with_suffix(".png"), TTFT_GOAL_S))
    return 0


if __name__ == "__main__":
    sys.exit(main())
