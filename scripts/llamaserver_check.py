"""The routed llama.cpp backend end to end: chainlora serve --backend llamacpp in front of a real
llama-server, against chainlora's own engine.

    python scripts/llamaserver_check.py --library runs/demo/library --llama-server PATH/TO/llama-server

llama-server is not part of llama-cpp-python; build it from llama.cpp (`cmake -B build
-DLLAMA_CURL=OFF && cmake --build build --target llama-server`). The script exports the library
(`--format gguf --base-dtype f32`), starts llama-server with every adapter loaded and none
applied (the export's llama-server.sh), starts `chainlora serve LIB --backend llamacpp` in front
of it, sends the demo's test prompts as chat requests (each pinned to its task, and the same
prompts routed by the library's selector, model "chain"), and compares every answer and its
routing field with what chainlora's engine answers locally. Prints one JSON object; exits 1
under --min-agreement (0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited ({proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url}: not up after {seconds} s")


def cached_tokens(url: str) -> int | None:
    """llama-server's count of prompt tokens taken from a cache (its /metrics, when enabled)."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("llamacpp:prompt_tokens_cached") or line.startswith("llamacpp:n_prompt_tokens_cached"):
            return int(float(line.split()[-1]))
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", default="runs/demo/library")
    p.add_argument("--llama-server", required=True)
    p.add_argument("--per-task", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--min-agreement", type=float, default=0.95)
    p.add_argument("--cache-prompt", action="store_true",
                   help="llama-server with --cache-ram 0 and chainlora serve --backend-cache-prompt")
    p.add_argument("--keep-ram-cache", action="store_true",
                   help="with --cache-prompt: leave llama-server's host-memory prompt cache on (the unsafe setting)")
    p.add_argument("--slots", type=int, default=1, help="llama-server's parallel slots (-np)")
    args = p.parse_args(argv)
    import httpx

    from chainlora.data.records import load_demo
    from chainlora.inference.engine import Engine
    from chainlora.library.export import export

    out = Path(tempfile.mkdtemp(prefix="chainlora-llamaserver-"))
    report = export(args.library, out, "gguf", base_dtype="f32")
    lport, cport = free_port(), free_port()
    files = ["--lora", ",".join(a["path"] for a in report["adapters"].values())]
    ram = [] if not args.cache_prompt or args.keep_ram_cache else ["--cache-ram", "0"]
    llama = subprocess.Popen([args.llama_server, "-m", "base.gguf", *files, "--lora-init-without-apply",
                              "--port", str(lport), "-c", str(2048 * args.slots), "-np", str(args.slots), "-t", "2",
                              "--metrics", *ram], cwd=out,
                             stdout=subprocess.DEVNULL, stderr=open(out / "llama-server.log", "w"))
    front = None
    try:
        wait_for(f"http://127.0.0.1:{lport}/health", llama)
        front = subprocess.Popen([str(Path(sys.executable).with_name("chainlora")), "serve", args.library, "--port",
                                  str(cport), "--backend", "llamacpp", "--backend-url", f"http://127.0.0.1:{lport}",
                                  *(["--backend-cache-prompt"] if args.cache_prompt else [])],
                                 stdout=subprocess.DEVNULL, stderr=open(out / "chainlora.log", "w"),
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        wait_for(f"http://127.0.0.1:{cport}/health", front)
        engine = Engine.load(args.library)
        demo = load_demo()
        texts = [(t, r.text) for t in engine.tasks for r in demo[t].test[:args.per_task]]
        rows = {"pinned": [0, 0], "chain": [0, 0]}
        routes_equal, seconds = 0, {}
        for model in ("pinned", "chain"):
            local = engine.generate([x for _, x in texts], task=[t for t, _ in texts] if model == "pinned" else None,
                                    max_new_tokens=args.max_tokens, temperature=0.0)
            t0 = time.monotonic()
            for (task, text), mine in zip(texts, local):
                r = httpx.post(f"http://127.0.0.1:{cport}/v1/chat/completions", timeout=300, json={
                    "model": task if model == "pinned" else "chain", "temperature": 0,
                    "max_tokens": args.max_tokens, "messages": [{"role": "user", "content": text}]})
                body = r.json()
                answer = body["choices"][0]["message"]["content"].strip() if r.status_code == 200 else None
                rows[model][0] += answer == mine.text
                rows[model][1] += 1
                routes_equal += body.get("chainlora", {}).get("adapter") == mine.route.as_dict()["adapter"]
            seconds[model] = round(time.monotonic() - t0, 1)
        total = sum(a for a, _ in rows.values()) / sum(n for _, n in rows.values())
        result = {"answers_equal": {k: f"{a}/{n}" for k, (a, n) in rows.items()}, "agreement": round(total, 4),
                  "routing_field_equal": f"{routes_equal}/{sum(n for _, n in rows.values())}",
                  "cache_prompt": args.cache_prompt, "ram_cache": not ram, "slots": args.slots,
                  "seconds": seconds, "cached_prompt_tokens": cached_tokens(f"http://127.0.0.1:{lport}"),
                  "lora_adapters": httpx.get(f"http://127.0.0.1:{lport}/lora-adapters").json()}
        print(json.dumps(result, indent=2))
        return 0 if total >= args.min_agreement else 1
    finally:
        for proc in (front, llama):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
