"""A server on a network (#19): every failure the issue lists, reproduced against a live server
on loopback (chainlora's own connection protocol, a tiny model), and answered as it must be:
bounded, authenticated first, in OpenAI's error shape, with the server alive afterwards.

Numbers in the test names follow the issue: 1 stop strings, 2 work before authentication,
3 slow clients, 4 error shapes and ignored fields, 5 key handling, 6 files for people."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import httpx
import pytest

from chainlora.inference.engine import Engine
from chainlora.serve import Server, create_app
from chainlora.serve.limits import Limits
from conftest import LiveApp

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=1.0, max_connections=12)
CHAT = "/v1/chat/completions"


def hello(**extra) -> dict:
    return {"model": "antonym", "messages": [{"role": "user", "content": "Give the antonym of hot."}],
            "max_tokens": 3, "temperature": 0, **extra}


class Live(LiveApp):
    def __init__(self, server: Server, limits: Limits):
        self.server = server
        super().__init__(create_app(server), limits=limits)

    def close(self) -> None:
        super().close()
        self.server.close()


@pytest.fixture(scope="module")
def engine(random_lib):
    return Engine.load(random_lib, device="cpu")


@pytest.fixture(scope="module")
def keyed(engine):
    srv = Live(Server(engine, api_key=KEY, limits=LIMITS), LIMITS)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def open_srv(engine):
    srv = Live(Server(engine, limits=LIMITS), LIMITS)
    yield srv
    srv.close()


def error_of(r: httpx.Response) -> dict:
    """The OpenAI error object of a response, asserting its shape."""
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def raw(srv: Live, data: bytes, *, wait: float = 10.0, send_after: bytes | None = None) -> tuple[bytes, float]:
    """Send raw bytes; read until the server closes (or `wait` passes): (reply, seconds)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return out, time.monotonic() - t0


def alive(srv: Live) -> None:
    r = httpx.post(f"{srv.url}{CHAT}", json=hello(), headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# --------------------------------------------------------------------------- 1 stop strings


def test_1_a_100kb_stop_string_is_refused_before_the_model_and_costs_nothing(keyed):
    before = rss_mb()
    r = httpx.post(f"{keyed.url}{CHAT}", json=hello(stop=["a" * 100_000]), headers=AUTH, timeout=60)
    assert r.status_code == 400 and error_of(r)["param"] == "stop" and "--max-stop-chars" in error_of(r)["message"]
    r = httpx.post(f"{keyed.url}{CHAT}", json=hello(stop=["a", "b", "c", "d", "e"]), headers=AUTH, timeout=60)
    assert r.status_code == 400 and "--max-stops" in error_of(r)["message"]
    assert rss_mb() - before < 100
    alive(keyed)


def test_1_stop_matching_memory_is_bounded_by_the_strings_not_cached(engine):
    """With the limit raised to 2,000 characters, distinct long stop strings are matched
    without transformers' per-string tables (which took 390 MB each, kept for ever)."""
    from transformers.generation import stopping_criteria

    srv = Live(Server(engine, limits=Limits(max_stop_chars=4000)), LIMITS)
    try:
        cached = len(stopping_criteria.STOP_STRING_EMBEDDING_CACHE)
        before = rss_mb()
        for ch in "xyz":
            r = httpx.post(f"{srv.url}{CHAT}", json=hello(stop=[ch * 2000], max_tokens=8), timeout=120)
            assert r.status_code == 200, r.text
        assert len(stopping_criteria.STOP_STRING_EMBEDDING_CACHE) == cached
        assert rss_mb() - before < 150
    finally:
        srv.close()


def test_1_stop_matcher_ends_each_row_at_its_stop_string(engine):
    import torch

    from chainlora.inference.stops import StopMatcher

    tok = engine.tok
    prompt = tok("Hello", return_tensors="pt")["input_ids"]
    rows = [tok(" the cat sat", add_special_tokens=False)["input_ids"],
            tok(" a dog ran!", add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    rows = [r + [tok.pad_token_id or 0] * (width - len(r)) for r in rows]
    matcher = StopMatcher(tok, ["cat", "xyz"])
    seen = []
    for n in range(1, width + 1):  # generate calls it after each new token
        ids = torch.cat([prompt.repeat(2, 1), torch.tensor(rows)[:, :n]], dim=1)
        seen.append(matcher(ids, None).tolist())
    assert seen[-1] == [True, False]  # row 0 holds "cat", row 1 never a stop string
    assert not any(flags[1] for flags in seen)
    assert StopMatcher(tok, ["Hello"])(torch.cat([prompt, torch.tensor([rows[1][:1]])], 1), None).tolist() == [False]


# --------------------------------------------------------------------------- 2 authentication first


def test_2_no_key_no_work_a_34mb_body_is_refused_before_it_is_read(keyed):
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {34 << 20}\r\n\r\n").encode()
    reply, seconds = raw(keyed, head + b'{"model": "chain", "messages": [' + b'{"role": "bogus"},' * 1000)
    assert reply.startswith(b"HTTP/1.1 401") and b'"invalid_api_key"' in reply
    assert seconds < 5  # answered on the headers; the old server parsed 34 MB first (9.4 s)
    alive(keyed)


@pytest.mark.parametrize("headers", [{}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY},
                                     {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"}])
def test_2_an_invalid_body_without_the_key_is_401_not_400(keyed, headers):
    r = httpx.post(f"{keyed.url}{CHAT}", content=b'{"messages": [{"role": "bogus"}]}', headers=headers, timeout=30)
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"


def test_2_bodies_over_the_limit_are_413_declared_or_chunked(keyed):
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100000000\r\n\r\n"
    reply, seconds = raw(keyed, head.encode())
    assert reply.startswith(b"HTTP/1.1 413") and b"--max-body-mb" in reply and seconds < 5

    def chunks():
        for _ in range(5):
            yield b" " * (1 << 20)

    r = httpx.post(f"{keyed.url}{CHAT}", content=chunks(), headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    alive(keyed)


def test_2_message_count_and_prompt_characters_are_checked_before_tokenizing(keyed):
    many = {"model": "chain", "messages": [{"role": "user", "content": "hi"}] * 10_000}
    r = httpx.post(f"{keyed.url}{CHAT}", json=many, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "--max-messages" in error_of(r)["message"]
    long = hello(messages=[{"role": "user", "content": "word " * 30_000}])  # 150 KB: under the body limit
    r = httpx.post(f"{keyed.url}{CHAT}", json=long, headers=AUTH, timeout=30)
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    assert "--max-prompt-chars" in error_of(r)["message"]
    r = httpx.post(f"{keyed.url}/v1/completions", json={"model": "chain", "prompt": "x" * 200_000}, headers=AUTH,
                   timeout=30)
    assert r.status_code == 400 and "--max-prompt-chars" in error_of(r)["message"]


def test_2_health_answers_quickly_while_the_worst_requests_are_rejected(keyed):
    """The event loop never parses, validates or tokenizes: /health stays fast while four
    clients send the largest bodies the limits let in (1 MB), each refused: no key; broken JSON;
    too many JSON values; too long; past the context after rendering and tokenizing."""
    stop = threading.Event()
    part = {"type": "text", "text": ""}
    worst = [(b"x" * (1 << 20), {}),
             (json.dumps({"model": "chain", "messages": [{"role": "user", "content": "a"}] * 40_000})
              .encode()[: (1 << 20) - 10], AUTH),
             (json.dumps(hello(messages=[{"role": "user", "content": [part] * 30_000}])).encode(), AUTH),
             (json.dumps(hello(messages=[{"role": "user", "content": "w " * 450_000}])).encode(), AUTH),
             (json.dumps({"model": "chain", "messages": [{"role": "user", "content": "word " * 80}] * 200})
              .encode(), AUTH)]  # rendered and tokenized: past the context
    statuses: list[int] = []

    def attack(body: bytes, headers: dict) -> None:
        while not stop.is_set():
            try:  # refused before its body is read, a client may see the connection close mid-send
                statuses.append(httpx.post(f"{keyed.url}{CHAT}", content=body, timeout=60,
                                           headers={"Content-Type": "application/json", **headers}).status_code)
            except httpx.TransportError:
                statuses.append(0)

    assert all(len(body) <= 1 << 20 for body, _ in worst)
    threads = [threading.Thread(target=attack, args=w, daemon=True) for w in worst]
    for t in threads:
        t.start()
    times = []
    try:
        time.sleep(0.5)
        with httpx.Client(timeout=30) as c:
            for _ in range(40):
                t0 = time.monotonic()
                assert c.get(f"{keyed.url}/health").status_code == 200
                times.append(time.monotonic() - t0)
                time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert len([s for s in statuses if s]) >= 4 and set(statuses) <= {0, 400, 401}, set(statuses)
    # the goal is 100 ms; this bound only catches a loop that stalls (the old server: 9.5 s)
    assert statistics.median(times) < 0.1 and max(times) < 2.0, (statistics.median(times), max(times))


# --------------------------------------------------------------------------- 3 slow clients


def test_3_half_sent_headers_are_cut_off(keyed):
    reply, seconds = raw(keyed, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert reply.startswith(b"HTTP/1.1 408") and b"--header-timeout" in reply
    assert seconds < 8  # the limit is 1 s here; the old server held it for ever


def test_3_a_body_that_never_comes_is_cut_off(keyed):
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{")
    reply, seconds = raw(keyed, head.encode())
    assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout" in reply and seconds < 8


def test_3_idle_connections_close_and_their_number_is_capped(keyed):
    socks = []
    try:
        for _ in range(LIMITS.max_connections + 3):
            socks.append(socket.create_connection(("127.0.0.1", keyed.port), timeout=10))
        time.sleep(0.3)
        refused = 0
        for s in socks[LIMITS.max_connections:]:
            data = s.recv(4096)
            refused += data.startswith(b"HTTP/1.1 503") and b"--max-connections" in data
        assert refused >= 3
    finally:
        for s in socks:
            s.close()
    time.sleep(1.5)  # the header deadline (1 s) closes the idle ones that were let in
    alive(keyed)
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=10) as s:  # keep-alive closes, too
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        t0, out = time.monotonic(), b""
        while chunk := s.recv(4096):
            out += chunk
        assert out.startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < 8


# --------------------------------------------------------------------------- 4 error shapes


@pytest.mark.parametrize("content", [
    b'{"model": "chain", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
    b'{"model": "chain", "messages": [{"role": "user", "content": "\xff\xfe bad utf-8"}]}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "chain", "max_tokens": 1' + b"0" * 5000 + b"}",
    b'{"model": "chain", "max_tokens": 1' + b"0" * 100 + b', "messages": [{"role": "user", "content": "x"}]}',
    b'{"model": "chain", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}',
    b'{"model": "chain", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}',
    b"not json", b"", b"[]", b"null",
], ids=["text-part-int", "not-utf8", "deep", "huge-int", "big-int", "nan", "unknown-field", "not-json", "empty",
        "array", "null"])
def test_4_bad_bodies_are_400_in_openai_shape(keyed, content):
    r = httpx.post(f"{keyed.url}{CHAT}", content=content, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    error_of(r)


def test_4_unknown_routes_and_methods_are_openai_shaped(keyed):
    r = httpx.get(f"{keyed.url}/v1/nothing", headers=AUTH, timeout=30)
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = httpx.get(f"{keyed.url}{CHAT}", headers=AUTH, timeout=30)
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
    r = httpx.get(f"{keyed.url}/docs", headers=AUTH, timeout=30)  # no CDN scripts: the docs page is off
    assert r.status_code == 404 and error_of(r)
    assert raw(keyed, b"BROKEN\r\n\r\n")[0].startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize("path,field,value", [
    (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]), (CHAT, "tool_choice", "required"),
    (CHAT, "top_logprobs", 2), (CHAT, "response_format", {"type": "json_object"}),
    (CHAT, "presence_penalty", 0.5), (CHAT, "logit_bias", {"42": 5}), (CHAT, "modalities", ["text", "audio"]),
    ("/v1/completions", "best_of", 2), ("/v1/completions", "suffix", "x"),
])
def test_4_fields_that_would_be_ignored_are_refused_by_name(keyed, path, field, value):
    body = hello() if path == CHAT else {"model": "antonym", "prompt": "Give the antonym of hot.", "max_tokens": 3}
    r = httpx.post(f"{keyed.url}{path}", json={**body, field: value}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and error_of(r)["param"] == field, r.text
    assert error_of(r)["code"] == "unsupported_parameter"


def test_4_neutral_values_and_text_parts_are_answered(keyed):
    body = hello(tools=[], tool_choice="none", logprobs=False, presence_penalty=0, response_format={"type": "text"},
                 user="u1", seed=3, messages=[{"role": "user", "content": [{"type": "text", "text": "Give the "},
                                                                          {"type": "text", "text": "antonym of hot."}]}])
    r = httpx.post(f"{keyed.url}{CHAT}", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    plain = httpx.post(f"{keyed.url}{CHAT}", json=hello(), headers=AUTH, timeout=60).json()
    assert r.json()["choices"][0]["message"] == plain["choices"][0]["message"]
    r = httpx.post(f"{keyed.url}{CHAT}", headers=AUTH, timeout=30, json=hello(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]))
    assert r.status_code == 400 and error_of(r)["param"] == "messages[0].content[0]"


def test_4_a_reply_appended_to_the_conversation_is_accepted(keyed):
    """What the official client sends when a reply's message goes back into `messages`."""
    from openai import OpenAI

    c = OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Give the antonym of hot."}]
    first = c.chat.completions.create(model="antonym", messages=msgs, max_tokens=3, temperature=0)
    msgs += [first.choices[0].message.model_dump(), {"role": "user", "content": "And of tall?"}]
    again = c.chat.completions.create(model="antonym", messages=msgs, max_tokens=3, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_4_random_paths_do_not_grow_the_metrics(keyed):
    for i in range(300):
        httpx.get(f"{keyed.url}/x{i}", timeout=30)
        httpx.get(f"{keyed.url}/y{i}", headers=AUTH, timeout=30)
    text = httpx.get(f"{keyed.url}/metrics", headers=AUTH, timeout=30).text
    assert "/x1" not in text and "/y1" not in text and 'endpoint="other"' in text


# --------------------------------------------------------------------------- 5 key handling


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_5_the_bearer_scheme_is_required_in_any_case(keyed, scheme):
    r = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": f"{scheme} {KEY}"}, timeout=30)
    assert r.status_code == 200
    assert httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": KEY}, timeout=30).status_code == 401


def test_5_with_a_key_only_a_minimal_health_is_open(keyed, random_lib):
    for path in ("/metrics", "/openapi.json", "/v1/models"):
        r = httpx.get(f"{keyed.url}{path}", timeout=30)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key", path
        assert httpx.get(f"{keyed.url}{path}", headers=AUTH, timeout=30).status_code == 200, path
    r = httpx.get(f"{keyed.url}/health", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    full = httpx.get(f"{keyed.url}/health", headers=AUTH, timeout=30).json()
    assert full["models"][0] == "chain" and str(random_lib) not in json.dumps(full)
    r = httpx.post(f"{keyed.url}/v1/adapters/reload", json={}, timeout=30)
    assert r.status_code == 401


def test_5_without_a_key_reload_needs_loopback_and_a_json_content_type(open_srv, engine):
    r = httpx.post(f"{open_srv.url}/v1/adapters/reload", content=b"x", headers={"Content-Type": "text/plain"},
                   timeout=30)  # what a web page can send cross-origin without a preflight
    assert r.status_code == 415 and error_of(r)
    r = httpx.post(f"{open_srv.url}/v1/adapters/reload", timeout=30)
    assert r.status_code == 415
    assert httpx.post(f"{open_srv.url}/v1/adapters/reload", json={}, timeout=60).status_code == 200
    import asyncio

    async def from_elsewhere() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(open_srv.server), client=("10.1.2.3", 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://192.0.2.1:8000") as c:  # Host: an IP
            return await c.post("/v1/adapters/reload", json={})

    r = asyncio.run(from_elsewhere())
    assert r.status_code == 403 and "loopback" in error_of(r)["message"]


def test_5_key_sources_and_warnings(cli, tmp_path):
    missing = tmp_path / "no-library"
    key_file = tmp_path / "key"
    key_file.write_text("sk-file\n")
    r = cli("serve", str(missing), "--host", "0.0.0.0")
    assert r.returncode == 2 and "without an API key" in r.stderr
    r = cli("serve", str(missing), "--host", "0.0.0.0", "--api-key-file", str(key_file))
    assert r.returncode == 2 and "chainlora: warning" not in r.stderr
    r = cli("serve", str(missing), "--api-key", "sk-arg")
    assert r.returncode == 2 and "shows in `ps`" in r.stderr
    r = cli("serve", str(missing), "--api-key", "a", "--api-key-file", str(key_file))
    assert r.returncode == 2 and "one way" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").write_text("\n")
    r = cli("serve", str(missing), "--api-key-file", str(tmp_path / "empty"))
    assert r.returncode == 2 and "one key" in r.stderr
    r = cli("serve", str(missing), "--max-body-mb", "0")
    assert r.returncode == 2 and "--max-body-mb must be > 0" in r.stderr


# --------------------------------------------------------------------------- 6 files for people


def test_6_report_markdown_and_csv_cells_are_inert():
    from chainlora.eval.annotate import spreadsheet_safe
    from chainlora.eval.report import md_text

    assert md_text("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)&gt;"
    assert md_text("[click](http://evil) | ![i](x)\nnext") == r"\[click\](http://evil) \| !\[i\](x) next"
    for cell in ("=HYPERLINK(\"http://x\")", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert spreadsheet_safe(cell) == "'" + cell
    assert spreadsheet_safe("plain answer") == "plain answer"


def test_3_a_flood_of_bad_connections_is_not_a_flood_of_log_lines(caplog):
    import logging

    from chainlora.serve.connections import Quiet

    quiet, logger = Quiet(every=60), logging.getLogger("chainlora.test.quiet")
    with caplog.at_level(logging.WARNING, logger="chainlora.test.quiet"):
        for _ in range(500):
            quiet.warn(logger, "headers: not received")
    assert len(caplog.records) == 1 and quiet.skipped == 499
