"""The LLM judge end to end over loopback HTTP: a small FastAPI app answers like a judge (with
flaky replies, server errors and unparseable scores); chainlora retries, records missing
scores as missing, caches every reply and pays nothing on a rerun."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from fastapi import FastAPI, Request

from chainlora.eval import judge


@pytest.mark.parametrize("reply, score", [
    ("Clear and right.\n5", 5), ("...\nScore: 4", 4), ("ok\n**6/6**", 6), ("fine\n3 out of 6", 3),
    ("I would say 5.\n", None), ("7", None), ("", None), (None, None), ("Score 2\n\n", 2), ("2.", 2),
])
def test_parse_score_reads_only_the_last_line(reply, score):
    assert judge.parse_score(reply) == score


def fake_judge() -> tuple[FastAPI, dict]:
    """Answers by the prompt's hash: most get reasoning + score, some need the retry, some never
    give a score; the very first call fails with 503 (retried)."""
    app, seen = FastAPI(), {"calls": 0, "auth": set()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen["calls"] += 1
        seen["auth"].add(request.headers.get("authorization"))
        if seen["calls"] == 1:
            from fastapi.responses import JSONResponse

            return JSONResponse({"error": {"message": "busy"}}, status_code=503)
        prompt = body["messages"][0]["content"]
        h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
        retry = len(body["messages"]) > 1
        if h % 5 == 0:
            content = "I cannot decide."  # never a score: missing
        elif h % 3 == 0 and not retry:
            content = "The answer is short.\nI rate it as quite good."  # fixed by the retry
        else:
            content = f"Reasoning about the answer.\n{1 + h % 6}"
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}]}

    return app, seen


@pytest.mark.slow
def test_judge_round_trip_with_retries_missing_and_cache(random_lib, tmp_path, live_app, cli, monkeypatch):
    lib = tmp_path / "lib"
    shutil.copytree(random_lib, lib)
    app, seen = fake_judge()
    server = live_app(app)
    args = ["judge", str(lib), "--data", "demo", "--per-task", "2", "--judge-url", f"{server.url}/v1",
            "--judge-model", "fake-judge", "--api-key-env", "FAKE_JUDGE_KEY", "--max-new-tokens", "4", "--json"]
    r = cli(*args, env={"FAKE_JUDGE_KEY": "k123"})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["summary"]
    assert list(summary) == ["chain", "mixed", "base"] and all(s["n"] == 10 for s in summary.values())
    saved = json.loads((lib / "eval/judge-demo.json").read_text())
    ratings = saved["ratings"]
    assert len(ratings) == 30
    for row in ratings:
        assert row["score"] is None or 1 <= row["score"] <= 6
    missing = [row for row in ratings if row["score"] is None]
    assert all(row["retried"] for row in missing)  # asked twice before giving up
    assert sum(s["missing"] for s in summary.values()) == len(missing)
    for s in summary.values():
        scored = [row["score"] for row in ratings if row["system"] == s and row["score"] is not None]
        assert s["scored"] + s["missing"] == 10
        assert sum(s["distribution"].values()) == s["scored"]
        if scored:
            assert s["mean"] == pytest.approx(sum(scored) / len(scored))
    unique = {(row["instruction"], row["answer"]) for row in ratings}
    retried = sum(row["retried"] for row in ratings if row["score"] is not None)
    assert seen["auth"] == {"Bearer k123"}
    first_calls = seen["calls"]
    assert first_calls >= len(unique) + 1  # one 503 retried, retries for the unparseable ones
    assert saved["calls"] == first_calls
    assert first_calls <= len(unique) + 1 + retried + len(missing)  # nothing paid twice
    r = cli(*args, env={"FAKE_JUDGE_KEY": "k123"})  # a rerun pays nothing
    assert r.returncode == 0 and seen["calls"] == first_calls
    assert json.loads(r.stdout)["calls"] == 0


@pytest.mark.slow
def test_judge_gives_up_with_one_clear_line(random_lib, tmp_path, live_app, cli):
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat():
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": {"message": "no such model"}}, status_code=404)

    server = live_app(app)
    lib = tmp_path / "lib"
    shutil.copytree(random_lib, lib)
    r = cli("judge", str(lib), "--data", "demo", "--per-task", "1", "--judge-url", server.url,
            "--judge-model", "nope", "--max-new-tokens", "2")
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert r.returncode == 2 and len(errors) == 1 and "HTTP 404" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_same_prompt_is_paid_once_and_a_torn_cache_line_costs_nothing_else(live_app, tmp_path):
    import asyncio

    app, seen = fake_judge()
    seen["calls"] = 1  # skip the fake's opening 503
    server = live_app(app)
    cache = tmp_path / "cache.jsonl"

    async def rate(items):
        j = judge.Judge(f"{server.url}/v1", "fake", cache=cache, concurrency=4)
        try:
            return await judge.rate_all(j, items), j.calls
        finally:
            await j.close()

    items = [{"system": s, "task": "t", "instruction": "Say hi.", "reference": "hi", "answer": "hi"}
             for s in ("chain", "mixed", "base")]  # three systems, one identical answer
    rated, calls = asyncio.run(rate(items))
    assert len({r["score"] for r in rated}) == 1 and calls in (1, 2)  # 2 only if the fake wanted a retry
    lines = cache.read_text().splitlines()
    assert len(lines) == 1
    cache.write_bytes(cache.read_bytes() + '{"key": "torn", "reply": "é'.encode()[:-1])  # killed mid-write
    other = [{**items[0], "answer": "hello"}]
    rated2, calls2 = asyncio.run(rate(items + other))
    assert calls2 >= 1 and rated2[0]["score"] == rated[0]["score"]  # the old answer: from the cache
    keys = [json.loads(ln)["key"] for ln in cache.read_text(encoding="utf-8", errors="replace").splitlines()
            if ln.startswith('{"key": "') and ln.endswith("}")]
    assert len(keys) == 2  # the torn line did not swallow the new entry
    _, calls3 = asyncio.run(rate(items + other))
    assert calls3 == 0


def scripted_judge(statuses: list[int]) -> tuple[FastAPI, list[int]]:
    """Answers each call with the next status in `statuses` (the last one repeats): an error
    body with a 1 ms Retry-After for a non-200, else a reply scored 5. Records what it sent."""
    from fastapi.responses import JSONResponse

    app, sent = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        status = statuses[min(len(sent), len(statuses) - 1)]
        sent.append(status)
        assert "authorization" not in request.headers  # no key given: none sent
        if status != 200:
            return JSONResponse({"error": {"message": f"status {status}"}}, status_code=status,
                                headers={"retry-after-ms": "1"})
        body = await request.json()
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Good.\n5"},
                             "finish_reason": "stop"}]}

    return app, sent


def judge_once(url: str, retries: int = 2) -> tuple[dict, int]:
    """Rate one answer with a fresh judge (no cache): (the rating, the calls it counted)."""
    import asyncio

    async def go():
        j = judge.Judge(url, "fake", retries=retries, timeout_s=5)
        try:
            return await j.rate("Say hi.", "hi", "hi"), j.calls
        finally:
            await j.close()

    return asyncio.run(go())


def test_transient_errors_are_retried_and_every_try_is_counted(live_app):
    app, sent = scripted_judge([429, 503, 200])
    rating, calls = judge_once(f"{live_app(app).url}/v1", retries=2)
    assert rating["score"] == 5 and sent == [429, 503, 200] and calls == 3


@pytest.mark.parametrize("statuses, retries, message, tries", [
    ([400], 2, "HTTP 400: ", 1),  # permanent: reported at once, not retried
    ([503], 1, "gave up after 2 tries (HTTP 503: ", 2),  # transient, but it never recovers
])
def test_a_failure_is_one_line(live_app, statuses, retries, message, tries):
    from chainlora.errors import ChainloraError

    app, sent = scripted_judge(statuses)
    server = live_app(app)
    with pytest.raises(ChainloraError) as e:
        judge_once(f"{server.url}/v1", retries=retries)
    assert str(e.value).startswith(f"judge {server.url}/v1: {message}") and "\n" not in str(e.value)
    assert len(sent) == tries


def test_an_unreachable_judge_is_one_line():
    import socket

    from chainlora.errors import ChainloraError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ChainloraError, match=r"gave up after 1 tries \(\w+\)$"):
        judge_once(f"http://127.0.0.1:{port}/v1", retries=0)


def test_a_reply_that_is_not_a_chat_completion_is_one_line(live_app):
    from fastapi.responses import PlainTextResponse

    from chainlora.errors import ChainloraError

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat():
        return PlainTextResponse("<html>a captive portal</html>")

    with pytest.raises(ChainloraError, match=r"malformed reply \(AttributeError\)$"):
        judge_once(f"{live_app(app).url}/v1")
