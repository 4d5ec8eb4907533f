"""Fuzzing the server from its own OpenAPI schema (schemathesis): valid and invalid bodies,
headers and paths for every route, with and without the key. Whatever arrives: no 500, every
error in OpenAI's shape, every response as documented, and the server alive afterwards.

`make test` runs a bounded number of examples per route; `make fuzz` runs many more
(CHAINLORA_FUZZ_EXAMPLES)."""

from __future__ import annotations

import collections
import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from chainlora.inference.engine import Engine
from chainlora.serve import Server, create_app

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("CHAINLORA_FUZZ_EXAMPLES", "100"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(random_lib):
    server = Server(Engine.load(random_lib, device="cpu"), api_key=KEY, default_max_tokens=4, timeout_s=60)
    yield server
    server.close()


def without_lifespan(app):
    """The app with its lifespan answered here: schemathesis opens a test client (startup and
    shutdown) per call, and the server's shutdown would stop its scheduler for the next one."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    return wrapped


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_asgi("/openapi.json", without_lifespan(create_app(fuzz_server)), headers=AUTH)


def openai_shaped(response) -> None:
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body


BODIES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]
ROUTES = [(m, p, mode) for m, p in BODIES for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)] + [
    ("GET", "/v1/models", GenerationMode.POSITIVE), ("POST", "/v1/adapters/reload", GenerationMode.POSITIVE),
    ("GET", "/health", GenerationMode.POSITIVE), ("GET", "/metrics", GenerationMode.POSITIVE)]


@pytest.mark.parametrize("method,path,mode", ROUTES, ids=[f"{p}-{m.value}" for _, p, m in ROUTES])
def test_fuzz_every_route(api_schema, fuzz_server, method, path, mode):
    operation = api_schema[path][method]
    seen = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        for headers in (AUTH, {}):  # the same case with the key and without it
            response = case.call(headers=headers)
            case.validate_response(response, checks=CHECKS)
            openai_shaped(response)
            if not headers and path != "/health":
                assert response.status_code == 401
            seen.append(response.status_code if response.status_code != 400 else response.json()["error"]["message"][:40])

    run()
    print(path, mode.value, collections.Counter(seen).most_common(8))  # shown with pytest -s
    assert seen and fuzz_server.scheduler.thread.is_alive()
    response = api_schema[path][method].Case(headers=AUTH).call() if path == "/health" else None
    assert response is None or response.status_code == 200


def valid_requests():
    """Well-formed chat requests a client could send (the schema's fuzzing rarely builds one
    that reaches the model): they must be answered, streamed or whole, never a 500."""
    from hypothesis import strategies as st

    text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
    turn = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text})
    last = st.fixed_dictionaries({"role": st.just("user"), "content": text.filter(str.strip)})
    return st.fixed_dictionaries({
        "model": st.sampled_from(["chain", "mixed", "antonym", "rhyme"]),
        "messages": st.tuples(st.lists(turn, max_size=3), last).map(lambda t: [*t[0], t[1]]),
        "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
        "stream": st.booleans()},
        optional={"stop": st.lists(st.text(max_size=64), max_size=4), "seed": st.integers(0, 2**32),
                  "stream_options": st.just({"include_usage": True}), "top_logprobs": st.integers(0, 20)}
    ).map(lambda b: {**b, "logprobs": True} if "top_logprobs" in b else b)  # top_logprobs needs logprobs


def valid_scoring():
    """What lm-evaluation-harness and other logprob clients send to /v1/completions: prompts as
    text or (lists of) token ids, echo, logprobs 0-5, max_tokens 0 (with echo) or more."""
    from hypothesis import strategies as st

    ids = st.lists(st.integers(0, 250), min_size=1, max_size=12)
    text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30).filter(str.strip)
    return st.fixed_dictionaries({
        "model": st.sampled_from(["chain", "mixed", "antonym", "base"]),
        "prompt": st.one_of(text, ids, st.lists(ids, min_size=1, max_size=4), st.lists(text, min_size=1, max_size=3)),
        "echo": st.booleans(), "logprobs": st.integers(0, 5), "temperature": st.just(0)},
        optional={"seed": st.integers(0, 2**32)}).flatmap(
        lambda b: st.integers(0 if b["echo"] else 1, 3).map(lambda n: {**b, "max_tokens": n}))


def test_fuzz_valid_requests_reach_the_model(fuzz_server):
    from hypothesis import given
    from starlette.testclient import TestClient

    client = TestClient(without_lifespan(create_app(fuzz_server)), headers=AUTH)
    statuses = collections.Counter()

    @given(body=valid_requests())
    @settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(body) -> None:
        r = client.post("/v1/chat/completions", json=body)
        statuses[r.status_code] += 1
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400:
            assert r.json()["error"]["code"] == "context_length_exceeded", r.text
        elif body["stream"]:
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")

    run()
    print("valid requests:", dict(statuses))
    assert statuses[200] >= EXAMPLES // 4 and fuzz_server.scheduler.thread.is_alive()


def test_fuzz_valid_scoring_requests_are_answered_with_a_logprob_per_token(fuzz_server):
    from hypothesis import given
    from starlette.testclient import TestClient

    client = TestClient(without_lifespan(create_app(fuzz_server)), headers=AUTH)
    statuses = collections.Counter()

    @given(body=valid_scoring())
    @settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(body) -> None:
        r = client.post("/v1/completions", json=body)
        statuses[r.status_code] += 1
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400:
            assert r.json()["error"]["code"] == "context_length_exceeded", r.text
            return
        several = isinstance(body["prompt"], list) and not isinstance(body["prompt"][0], int)
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == list(range(len(body["prompt"]) if several else 1))
        for c in choices:
            lp = c["logprobs"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
            assert all(isinstance(x, float) for x in lp["token_logprobs"][1 if body["echo"] else 0:])
            assert not body["echo"] or lp["token_logprobs"][0] is None

    run()
    print("scoring requests:", dict(statuses))
    assert statuses[200] >= EXAMPLES // 4 and fuzz_server.scheduler.thread.is_alive()

