"""`serve --backend openai` against a recording fake backend: the backend receives exactly the
token ids the local engine would generate from (chat template and library system prompt applied
here), always as a completion, and the client gets the shape it asked for, [DONE] last."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from chainlora import library
from chainlora.inference.engine import Engine
from chainlora.serve import Server, create_app
from chainlora.serve.forward import Forwarder
from conftest import PIECES, Recording, sse

SYSTEM = "You are a terse lexicographer."


@pytest.fixture(scope="module")
def sys_lib(random_lib, tmp_path_factory):
    """The random library with a system prompt: the one thing a backend would drop."""
    root = tmp_path_factory.mktemp("syslib") / "lib"
    shutil.copytree(random_lib, root)
    manifest = json.loads((root / "chainlora.json").read_text())
    library.write_manifest(root, {**manifest, "system_prompt": SYSTEM})
    return root


@pytest.fixture(scope="module")
def servers(sys_lib):
    """(local server, its recorded generate inputs, front server, recording backend)."""
    from conftest import LiveApp

    local_engine = Engine.load(sys_lib, device="cpu")
    seen: list[list[list[int]]] = []
    inputs = local_engine._inputs

    def record(rendered):
        enc = inputs(rendered)
        seen.append([row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])])
        return enc

    local_engine._inputs = record
    rec = Recording()
    backend = LiveApp(rec.app())
    local = Server(local_engine)
    front = Server(Engine.load(sys_lib, device="cpu"), forwarder=Forwarder(backend.url))
    apps = [LiveApp(create_app(local)), LiveApp(create_app(front))]
    apps[0].server = local
    yield apps[0], seen, apps[1], rec
    for a in [*apps, backend]:
        a.close()
    local.scheduler.close()
    front.scheduler.close()


CHAT = {"messages": [{"role": "user", "content": "Give the antonym of hot."}]}
HISTORY = {"messages": [{"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": "Give the antonym of hot."},
                        {"role": "assistant", "content": "cold"},
                        {"role": "user", "content": "And of tall?"}]}
TEXT = {"prompt": "Give the antonym of hot."}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind,extra", [("chat", CHAT), ("chat", HISTORY), ("text", TEXT)],
                         ids=["chat", "history", "completion"])
@pytest.mark.parametrize("model", ["chain", "antonym"])
def test_the_backend_sees_the_local_engines_tokens(servers, kind, extra, model, stream):
    local, seen, front, rec = servers
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = {"model": model, "max_tokens": 5, "temperature": 0, "stop": ["\n\n"], "seed": 7, **extra,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    seen.clear()
    r = httpx.post(f"{local.url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    (local_ids,) = seen[-1]
    route = (sse(r)[0] if stream else r.json())["chainlora"]
    n = len(rec.calls)
    r = httpx.post(f"{front.url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert len(rec.calls) == n + 1
    where, sent = rec.calls[-1]
    assert where == "/v1/completions"  # never the chat endpoint: the backend renders nothing
    assert sent["prompt"] == local_ids  # the exact tokens, system prompt and template included
    assert sent["model"] == route["adapter"] and sent["max_tokens"] == 5 and sent["stop"] == ["\n\n"]
    assert sent["temperature"] == 0 and sent["seed"] == 7 and "messages" not in sent
    if not stream:
        out = r.json()
        assert out["model"] == model and out["chainlora"] == route and out["choices"][0]["finish_reason"] == "stop"
        if kind == "chat":
            assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
            assert out["choices"][0]["message"] == {"role": "assistant", "content": "".join(PIECES)}
        else:
            assert out["object"] == "text_completion" and out["choices"][0]["text"] == "".join(PIECES)
        return
    events = sse(r)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert all(c["chainlora"] == route and c["model"] == model for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == len(local_ids)
    if kind == "chat":
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "".join(PIECES)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_the_official_client_reads_forwarded_answers(servers):
    from openai import OpenAI

    _, _, front, _ = servers
    c = OpenAI(base_url=f"{front.url}/v1", api_key="none", max_retries=0, timeout=60)
    chat = c.chat.completions.create(model="chain", max_tokens=4, **CHAT)
    assert chat.choices[0].message.content == "".join(PIECES) and chat.model_extra["chainlora"]["adapter"]
    parts = list(c.chat.completions.create(model="rhyme", max_tokens=4, stream=True, **CHAT))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == "".join(PIECES)
    comp = c.completions.create(model="mixed", prompt=TEXT["prompt"], max_tokens=4)
    assert comp.choices[0].text == "".join(PIECES)


def test_a_backend_error_mid_stream_still_ends_with_done(sys_lib, live_app):
    rec = Recording(fail_stream=True)
    backend = live_app(rec.app())
    server = Server(Engine.load(sys_lib, device="cpu"), forwarder=Forwarder(backend.url))
    front = live_app(create_app(server))
    try:
        r = httpx.post(f"{front.url}/v1/chat/completions", json={"model": "antonym", "stream": True, "max_tokens": 4, **CHAT},
                       timeout=60)
        events = sse(r)
        assert r.status_code == 200 and events, (r.status_code, r.text)
        assert events[-1] == "[DONE]" and events[0]["error"]["message"] == "boom"
    finally:
        server.scheduler.close()


def test_token_prompts_are_answered_verbatim_and_routed_by_their_text(servers):
    """What a chainlora front sends a chainlora backend (pre-rendered token ids) and what
    lm-evaluation-harness sends: the ids are the model's input as they are; `chain` routes them
    by their decoded text."""
    local, seen, _, _ = servers
    engine = local.server.engine
    ids = [5, 17, 42, 99]
    seen.clear()
    r = httpx.post(f"{local.url}/v1/completions", json={"model": "antonym", "prompt": ids, "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200 and seen[-1] == [ids], r.text
    text = "Give the antonym of hot."
    ids = engine.tok(text, add_special_tokens=False)["input_ids"]
    r = httpx.post(f"{local.url}/v1/completions", json={"model": "chain", "prompt": ids, "max_tokens": 2}, timeout=60)
    (route,) = engine.route([text])
    assert r.status_code == 200 and seen[-1] == [ids] and r.json()["chainlora"] == route.as_dict(), r.text
    r = httpx.post(f"{local.url}/v1/completions", json={"model": "antonym", "prompt": [10**9]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_only_validated_fields_reach_the_backend(servers):
    """The backend sees the explicit sampling fields and the validated ones it implements;
    an unknown field, or a valid one outside its range, is a 400 here and never forwarded."""
    local, _, front, rec = servers
    n = len(rec.calls)
    body = {"model": "antonym", "max_tokens": 4, **CHAT, "presence_penalty": 0.5, "top_k": 5, "user": "u"}
    r = httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    sent = rec.calls[-1][1]
    assert sent["presence_penalty"] == 0.5 and sent["top_k"] == 5 and sent["user"] == "u"
    assert set(sent) <= {"model", "prompt", "max_tokens", "temperature", "top_p", "stream", "stop",
                         "stream_options", "presence_penalty", "top_k", "user"}
    for bad in ({"frobnicate": 1}, {"presence_penalty": 9}, {"logit_bias": {"1": "x"}}, {"tools": [{"type": "f"}]}):
        r = httpx.post(f"{front.url}/v1/chat/completions", json={**body, **bad}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"], (bad, r.text)
    assert len(rec.calls) == n + 1
    r = httpx.post(f"{local.url}/v1/chat/completions", json=body, timeout=60)  # the local engine has no penalties
    assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"
