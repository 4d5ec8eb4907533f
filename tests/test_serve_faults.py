"""One request never takes others down: a corrupt adapter or a task removed by a reload fails
only its own rows of a batch, and a generate that raises mid-stream still ends the stream
with an error event and [DONE]. Live server on loopback, every wait bounded."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import httpx
import pytest

from chainlora import library
from chainlora.inference.engine import Engine
from chainlora.serve import Server
from conftest import Live, _load, error_of, post_in_background, wait_until

MSG = [{"role": "user", "content": "Give the antonym of hot."}]


def body(model: str, **kw) -> dict:
    return {"model": model, "messages": MSG, "max_tokens": 4, "temperature": 0, **kw}


@pytest.fixture
def lib(random_lib, tmp_path):
    shutil.copytree(random_lib, tmp_path / "lib")
    return tmp_path / "lib"


def one_window(srv: Live, models: list[str]) -> list[httpx.Response]:
    """POST one request per model so that all of them land in ONE batch: the worker is held
    on the engine lock until it has collected every one."""
    url, outs = f"{srv.url}/v1/chat/completions", [{} for _ in models]
    with srv.server.engine.lock:
        threads = [post_in_background(url, body(m), out) for m, out in zip(models, outs)]
        wait_until(lambda: srv.server.scheduler.active == len(models))
    for t in threads:
        t.join(60)
    return [out["r"] for out in outs]


@pytest.mark.parametrize("adapters", ["peft", "pool"])
def test_a_corrupt_adapter_fails_only_its_own_rows(lib, adapters):
    weights = lib / "tasks/rhyme" / library.ADAPTER_FILES[-1]
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)  # same size, wrong bytes
    srv = Live(Server(Engine.load(lib, device="cpu", adapters=adapters), window_ms=5000, max_batch=3))
    try:
        good, bad, also = one_window(srv, ["antonym", "rhyme", "sentiment"])
        assert good.status_code == 200 and also.status_code == 200, (good.text, also.text)
        assert bad.status_code == 500 and "rhyme" in error_of(bad)["message"]
        assert "corrupt" in error_of(bad)["message"]
        assert srv.server.scheduler.stats.batches == 1 and srv.server.scheduler.stats.requests == 2
        alone = httpx.post(f"{srv.url}/v1/chat/completions", json=body("antonym"), timeout=60)
        assert alone.json()["choices"][0]["message"]["content"] == good.json()["choices"][0]["message"]["content"]
    finally:
        srv.close()


@pytest.mark.parametrize("adapters", ["peft", "pool"])
@pytest.mark.parametrize("when", ["before staging", "before generate"])
def test_a_task_removed_by_reload_while_its_request_waits_is_a_404(lib, when, adapters):
    engine = Engine.load(lib, device="cpu", adapters=adapters)
    manifest = json.loads((lib / library.MANIFEST).read_text())
    manifest["tasks"] = [t for t in manifest["tasks"] if t["name"] != "definition"]
    hooked = "stage" if when == "before staging" else "generate"
    real, fired = getattr(engine, hooked), threading.Event()

    def reload_first(*args, **kw):  # the reload lands after the rows were admitted
        if not fired.is_set():
            fired.set()
            library.write_manifest(lib, manifest)
            engine.reload()
        return real(*args, **kw)

    setattr(engine, hooked, reload_first)
    srv = Live(Server(engine, window_ms=5000, max_batch=2))
    try:
        gone, kept = one_window(srv, ["definition", "antonym"])
        assert fired.is_set()
        assert gone.status_code == 404 and error_of(gone)["code"] == "model_not_found", gone.text
        assert kept.status_code == 200, kept.text
    finally:
        srv.close()


def test_an_error_mid_stream_ends_it_with_an_error_event_and_done(random_lib):
    engine = Engine.load(random_lib, device="cpu")
    real = engine.generate

    def fails_after_three_tokens(*args, stopping=None, **kw):
        steps = [0]

        def stop(input_ids, scores, **k):
            steps[0] += 1
            if steps[0] > 3:
                raise RuntimeError("CUDA out of memory (simulated)")
            return stopping(input_ids, scores, **k)

        return real(*args, stopping=stop, **kw)

    engine.generate = fails_after_three_tokens
    srv = Live(Server(engine, timeout_s=60))
    try:
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", timeout=60,
                          json=body("antonym", max_tokens=12, stream=True)) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "RuntimeError" in error["message"] and error["type"] == "server_error"
        assert all("choices" in json.loads(e) for e in events[:-2])  # chunks before it, nothing after
    finally:
        srv.close()


def test_load_with_one_corrupt_adapter_fails_only_its_requests(lib):
    """The load test (200 requests, 32 at a time, streaming and not) on the pool, the server's
    default, with the sentiment adapter corrupt: its 50 requests fail, the 150 others do not."""
    weights = lib / "tasks/sentiment" / library.ADAPTER_FILES[-1]
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)
    srv = Live(Server(Engine.load(lib, device="cpu", adapters="pool"), window_ms=20))
    try:
        out = asyncio.run(_load(srv.url, 200, 32, models=("antonym", "sentiment", "mixed", "rhyme")))
        assert out["ok"] == 150 and out["failed"] == ["sentiment"] * 50, out["errors"][:3]
        assert all("sentiment" in e and "corrupt" in e for e in out["errors"]), out["errors"][:3]
        assert srv.server.scheduler.stats.batches < 150  # the failing rows shared batches with the others
    finally:
        srv.close()
