"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client and
raw HTTP: routing field, streaming, errors in OpenAI's shape, batching under load, early
disconnects, reload without restart. Every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time

import httpx
import pytest

from chainlora import library
from chainlora.inference.engine import Engine
from chainlora.serve import Server
from conftest import TEXTS, Live, _load, error_of, post_in_background, sse, wait_until


@pytest.fixture(scope="module")
def live(random_lib):
    srv = Live(Server(Engine.load(random_lib, device="cpu"), max_batch=16, window_ms=20))
    yield srv
    srv.close()


def client(live: Live, key: str = "none"):
    from openai import OpenAI

    return OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_models_list_chain_mixed_and_tasks(live):
    ids = [m.id for m in client(live).models.list().data]
    assert ids == ["chain", "mixed", "antonym", "sentiment", "rhyme", "hypernym", "definition", "base"]


@pytest.mark.parametrize("model", ["chain", "sentiment"])
def test_chat_and_completions_with_the_official_client(live, model):
    c = client(live)
    chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": TEXTS[1]}],
                                     max_tokens=6, temperature=0)
    route = chat.model_extra["chainlora"]
    assert chat.object == "chat.completion" and isinstance(chat.choices[0].message.content, str)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 6
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert set(route) == {"task", "probability", "top_k", "fallback", "adapter", "selector", "reason", "similarity"}
    if model == "chain":  # the library's default (no selection recorded, no classifier: score)
        assert route["selector"] == live.server.engine.selector == "score"
        assert route["task"] in ids_of(live) and 0 < route["probability"] <= 1
        assert (route["reason"] is None) == (not route["fallback"])
    else:
        assert route == {"task": "sentiment", "probability": 1.0, "top_k": [["sentiment", 1.0]],
                         "fallback": False, "adapter": "sentiment", "selector": "pinned",
                         "reason": None, "similarity": None}
    # the engine, asked directly, answers the same (greedy)
    (direct,) = live.server.engine.generate([TEXTS[1]], task=route["adapter"], max_new_tokens=6)
    assert chat.choices[0].message.content == direct.text
    comp = c.completions.create(model=model, prompt=TEXTS[1], max_tokens=6, temperature=0)
    assert comp.object == "text_completion" and comp.choices[0].text == direct.text
    assert comp.model_extra["chainlora"]["adapter"] == route["adapter"]


def ids_of(live) -> list[str]:
    return live.server.models()


@pytest.mark.parametrize("model", ["chain", "antonym"])
def test_streaming_matches_the_whole_answer(live, model):
    c = client(live)
    whole = c.chat.completions.create(model=model, messages=[{"role": "user", "content": TEXTS[0]}],
                                      max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": TEXTS[0]}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.model_extra["chainlora"]["adapter"] == whole.model_extra["chainlora"]["adapter"] for ch in chunks)
    pieces = list(c.completions.create(model=model, prompt=TEXTS[0], max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].message.content


def test_stop_strings_and_multi_turn_chat(live):
    c = client(live)
    whole = c.completions.create(model="rhyme", prompt=TEXTS[2], max_tokens=16, temperature=0).choices[0].text
    assert len(whole) > 3  # random adapters on the tiny model never end early; else this test tests nothing
    cut = whole[2:4]
    stopped = c.completions.create(model="rhyme", prompt=TEXTS[2], max_tokens=16, temperature=0, stop=[cut])
    assert stopped.choices[0].text == whole[: whole.index(cut)].strip()
    streamed = "".join(p.choices[0].text for p in c.completions.create(
        model="rhyme", prompt=TEXTS[2], max_tokens=16, temperature=0, stop=[cut], stream=True))
    assert streamed == stopped.choices[0].text
    turns = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
             {"role": "user", "content": TEXTS[0]}]
    reply = c.chat.completions.create(model="chain", messages=turns, max_tokens=4, temperature=0)
    assert reply.model_extra["chainlora"]["task"] is not None  # routed on the last user turn


def test_bad_requests_get_openai_errors(live):
    url = f"{live.url}/v1/chat/completions"
    ok = {"model": "chain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ({**ok, "model": "gpt-9"}, 404, "model", "model_not_found"),
        ({"model": "chain"}, 400, "messages", None),
        ({**ok, "max_tokens": 0}, 400, "max_tokens", None),
        ({**ok, "temperature": 5}, 400, "temperature", None),
        ({**ok, "n": 2}, 400, "n", None),
        ({**ok, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages", "context_length_exceeded"),
        ({**ok, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", None),
    ]
    for body, status, param, code in cases:
        r = httpx.post(url, json=body, timeout=30)
        e = error_of(r)
        assert r.status_code == status and e["param"] == param and e["code"] == code, (body, r.text)
        assert param.split(".")[0] in e["message"]
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    r = httpx.post(f"{live.url}/v1/completions", json={"model": "chain", "prompt": ""}, timeout=30)
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"


def test_api_key_is_required_and_compared(random_lib):
    srv = Live(Server(Engine.load(random_lib, device="cpu"), api_key="s3cret"))
    try:
        body = {"model": "antonym", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cre"}):
            r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert httpx.post(f"{srv.url}/v1/adapters/reload", timeout=30).status_code == 401
        assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
        out = client(srv, "s3cret").chat.completions.create(model="antonym", messages=body["messages"], max_tokens=2)
        assert out.choices[0].message.content is not None
    finally:
        srv.close()


def test_full_queue_answers_429_with_retry_after(random_lib):
    engine = Engine.load(random_lib, device="cpu")
    srv = Live(Server(engine, max_queue=1, window_ms=0))
    body = {"model": "antonym", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = f"{srv.url}/v1/chat/completions"
    try:
        with engine.lock:  # the worker blocks on the engine: requests pile up
            first = post_in_background(url, body)
            wait_until(lambda: srv.server.scheduler.active > 0)  # the worker took it, waits for the engine
            second = post_in_background(url, body)
            wait_until(lambda: srv.server.scheduler.waiting >= 1)
            r = httpx.post(url, json=body, timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert error_of(r)["code"] == "queue_full"
        first.join(60), second.join(60)
        assert "chainlora_rejected_total 1.0" in httpx.get(f"{srv.url}/metrics", timeout=30).text
    finally:
        srv.close()


def test_request_past_its_timeout_gets_503(random_lib):
    engine = Engine.load(random_lib, device="cpu")
    srv = Live(Server(engine, timeout_s=0.3, window_ms=0))
    body = {"model": "antonym", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = f"{srv.url}/v1/chat/completions"
    try:
        with engine.lock:
            blocker = post_in_background(url, body)
            wait_until(lambda: srv.server.scheduler.active > 0)
            late: dict = {}
            waiter = post_in_background(url, body, late)
            time.sleep(0.8)  # the second request's deadline passes while it waits
        waiter.join(60), blocker.join(60)
        assert late["r"].status_code == 503 and error_of(late["r"])["code"] == "timeout"
        assert late["r"].headers["retry-after"] == "1"
    finally:
        srv.close()


def test_load_200_requests_32_concurrent_batches_without_errors(live):
    before = live.server.scheduler.stats.batches, live.server.scheduler.stats.requests
    t0 = time.monotonic()
    out = asyncio.run(_load(live.url, 200, 32))
    seconds = time.monotonic() - t0
    assert out["errors"] == [] and out["ok"] == 200
    batches = live.server.scheduler.stats.batches - before[0]
    requests = live.server.scheduler.stats.requests - before[1]
    assert requests == 200 and batches < 200  # requests shared generate calls
    print(f"load: 200 requests in {seconds:.1f} s, {batches} batches ({requests / batches:.1f} requests each)")
    metrics = httpx.get(f"{live.url}/metrics", timeout=30).text
    for name in ("chainlora_requests_total", "chainlora_batch_size_bucket", "chainlora_adapter_cache_hits_total",
                 "chainlora_routed_total", "chainlora_request_seconds_bucket", "chainlora_completion_tokens_total"):
        assert name in metrics


def _samples(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels
            or set(s.labels) == {"le"} and s.labels["le"] == "+Inf"}


def test_metrics_time_first_tokens_and_the_gaps_between_tokens(live):
    """Every answered request adds one time-to-first-token sample, within its latency, and one
    inter-token sample per token after its first (streamed or not)."""
    before = _samples(live.url)
    tokens, latency = [], 0.0
    for i, stream in enumerate([False, True, False]):
        body = {"model": "chain", "prompt": TEXTS[i], "max_tokens": 6 + i, "temperature": 0}
        if stream:
            body["stream_options"] = {"include_usage": True}
        t0 = time.monotonic()
        r = httpx.post(f"{live.url}/v1/completions", json={**body, "stream": stream}, timeout=60)
        latency += time.monotonic() - t0
        usage = r.json()["usage"] if not stream else [c for c in sse(r) if c != "[DONE]" and c.get("usage")][-1]["usage"]
        tokens.append(usage["completion_tokens"])
    after = _samples(live.url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["chainlora_time_to_first_token_seconds_count"] == sum(n > 0 for n in tokens) == 3
    assert delta["chainlora_inter_token_latency_seconds_count"] == sum(max(n - 1, 0) for n in tokens)
    assert 0 < delta["chainlora_time_to_first_token_seconds_sum"] < latency
    assert 0 < delta["chainlora_inter_token_latency_seconds_sum"] < latency


def test_clients_that_hang_up_free_their_rows(live):
    before = live.server.scheduler.stats.cancelled
    out = asyncio.run(_load(live.url, 60, 16, disconnect_every=2, max_tokens=120))
    assert out["errors"] == [] and out["disconnected"] >= 5 and out["ok"] + out["disconnected"] == 60
    wait_until(lambda: live.server.scheduler.stats.cancelled > before, 30)  # rows of gone clients stopped
    after = asyncio.run(_load(live.url, 8, 8))  # the server keeps answering
    assert after["ok"] == 8
    assert live.server.scheduler.waiting == 0


def test_reload_adds_changes_and_removes_adapters_without_restart(random_lib, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(random_lib, lib)
    srv = Live(Server(Engine.load(lib, device="cpu")))
    c = client(srv)
    msg = [{"role": "user", "content": TEXTS[0]}]
    try:
        before = c.chat.completions.create(model="antonym", messages=msg, max_tokens=6, temperature=0)
        manifest = json.loads((lib / library.MANIFEST).read_text())
        # add "opposite" (a copy of rhyme), change antonym (becomes hypernym's weights), remove definition
        shutil.copytree(lib / "tasks/rhyme", lib / "tasks/opposite")
        manifest["tasks"].append({**next(t for t in manifest["tasks"] if t["name"] == "rhyme"),
                                  "name": "opposite", "label": "opposite", "path": "tasks/opposite"})
        for f in library.ADAPTER_FILES:
            shutil.copy(lib / "tasks/hypernym" / f, lib / "tasks/antonym" / f)
        hyp = next(t for t in manifest["tasks"] if t["name"] == "hypernym")
        next(t for t in manifest["tasks"] if t["name"] == "antonym")["sha256"] = hyp["sha256"]
        manifest["tasks"] = [t for t in manifest["tasks"] if t["name"] != "definition"]
        library.write_manifest(lib, manifest)
        r = httpx.post(f"{srv.url}/v1/adapters/reload", json={}, timeout=60)
        assert r.status_code == 200, r.text
        assert {k: r.json()[k] for k in ("added", "changed", "removed")} == {
            "added": ["opposite"], "changed": ["antonym"], "removed": ["definition"]}
        after = c.chat.completions.create(model="antonym", messages=msg, max_tokens=6, temperature=0)
        hyper = c.chat.completions.create(model="hypernym", messages=msg, max_tokens=6, temperature=0)
        assert after.choices[0].message.content == hyper.choices[0].message.content
        assert before.choices[0].message.content != after.choices[0].message.content
        assert c.chat.completions.create(model="opposite", messages=msg, max_tokens=2).choices
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "definition", "messages": msg}, timeout=30)
        assert r.status_code == 404
        (lib / "tasks/rhyme/adapter_model.safetensors").write_bytes(b"corrupt")
        r = httpx.post(f"{srv.url}/v1/adapters/reload", json={}, timeout=60)
        assert r.status_code == 400 and "sha256" in error_of(r)["message"]
        assert "antonym" in [m.id for m in c.models.list().data]  # the old library stays in service
    finally:
        srv.close()


def test_per_row_token_limits_match_separate_calls(random_lib):
    engine = Engine.load(random_lib, device="cpu")
    together = engine.generate(TEXTS[:2], task=["antonym", None], max_new_tokens=[3, 9])
    alone = [engine.generate([TEXTS[0]], task="antonym", max_new_tokens=3)[0],
             engine.generate([TEXTS[1]], max_new_tokens=9)[0]]
    assert [a.text for a in together] == [a.text for a in alone]
    assert together[0].completion_tokens <= 3 and together[1].route.selector == "score"


def test_forwarding_routes_here_and_answers_on_the_backend(random_lib):
    """`serve --backend openai`: a second chainlora server on loopback stands in for vLLM."""
    from chainlora.serve.forward import Forwarder

    backend = Live(Server(Engine.load(random_lib, device="cpu")))
    front = Live(Server(Engine.load(random_lib, device="cpu"), forwarder=Forwarder(backend.url)))
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    nowhere = Live(Server(Engine.load(random_lib, device="cpu"),
                          forwarder=Forwarder(f"http://127.0.0.1:{dead.getsockname()[1]}")))
    try:
        f, b = client(front), client(backend)
        msg = [{"role": "user", "content": TEXTS[1]}]
        routed = f.chat.completions.create(model="chain", messages=msg, max_tokens=6, temperature=0)
        route = routed.model_extra["chainlora"]
        assert route["selector"] == "score" and route["adapter"]
        direct = b.chat.completions.create(model=route["adapter"], messages=msg, max_tokens=6, temperature=0)
        assert routed.choices[0].message.content == direct.choices[0].message.content
        assert routed.model == "chain"  # the model the client asked for, as on the local path
        pinned = f.completions.create(model="rhyme", prompt=TEXTS[2], max_tokens=6, temperature=0)
        assert pinned.choices[0].text == b.completions.create(model="rhyme", prompt=TEXTS[2], max_tokens=6,
                                                              temperature=0).choices[0].text
        chunks = list(f.chat.completions.create(model="chain", messages=msg, max_tokens=6, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            direct.choices[0].message.content
        assert all(c.model_extra["chainlora"] == route for c in chunks)
        assert backend.server.scheduler.stats.requests >= 4 and front.server.scheduler.stats.requests == 0
        r = httpx.post(f"{front.url}/v1/chat/completions", json={"model": "nope", "messages": msg}, timeout=30)
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
        r = httpx.post(f"{nowhere.url}/v1/chat/completions", json={"model": "chain", "messages": msg,
                                                                   "max_tokens": 2}, timeout=30)
        assert r.status_code == 502 and error_of(r)["code"] == "backend_error"
    finally:
        for s in (front, backend, nowhere):
            s.close()
        dead.close()


@pytest.mark.parametrize("kind", ["sft", "encoder", "classifier"])
def test_chain_is_served_whatever_selector_kind_the_library_measured_best(random_lib, tmp_path, kind):
    """A library whose default selector is not the LoRA router (here: no router at all) still
    answers model="chain"; serve/app.py once knew only classifier and encoder (issue 39)."""
    from chainlora.serve.schema import ApiError

    lib = tmp_path / "lib"
    shutil.copytree(random_lib, lib)
    m = json.loads((lib / library.MANIFEST).read_text())
    del m["router"]
    m[kind] = {"name": kind, "path": kind, "sha256": "0" * 64}
    m["selection"] = {"winner": kind, "selectors": {kind: {"threshold": 0.5}}}
    (lib / library.MANIFEST).write_text(json.dumps(m))
    srv = Server(Engine.load(lib, device="cpu"))
    try:
        assert srv.engine.selector == kind and srv.pin("chain") is None
        del m[kind], m["selection"]
        (lib / library.MANIFEST).write_text(json.dumps(m))
        bare = Server(Engine.load(lib, device="cpu"))  # no selector at all: 404 naming the models
        with pytest.raises(ApiError, match="needs a task selector"):
            bare.pin("chain")
        bare.close()
    finally:
        srv.close()


def test_serve_defaults_and_choices_come_from_the_settings(monkeypatch):
    """`chainlora serve` with no flags is ServeSettings() (issue 39: the defaults were written three
    times); --backend / --adapters are argparse choices, and a Python caller's bad backend fails
    with the same one line before anything loads."""
    from chainlora.cli import build_parser
    from chainlora.cli.serve import settings
    from chainlora.errors import ChainloraError
    from chainlora.serve import ServeSettings
    from chainlora.serve.settings import DEFAULTS

    for name in ("CHAINLORA_API_KEY", "CHAINLORA_BACKEND_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert settings(build_parser().parse_args(["serve", "LIB"])) == DEFAULTS == ServeSettings()
    with pytest.raises(ChainloraError, match="invalid choice: 'nope'"):
        build_parser().parse_args(["serve", "LIB", "--backend", "nope"])
    args = build_parser().parse_args(["serve", "LIB", "--backend", "openai"])  # a choice; the URL is missing
    with pytest.raises(ChainloraError, match="needs --backend-url"):
        settings(args)
    with pytest.raises(ChainloraError, match="--backend: unknown 'nope'"):
        ServeSettings.of(backend="nope")
    assert ServeSettings.of(DEFAULTS, max_batch=4).max_batch == 4 and DEFAULTS.max_batch == 16
