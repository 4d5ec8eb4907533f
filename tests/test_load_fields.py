"""The request fields load-testing tools send (GuideLLM, vLLM's benchmark, AIPerf): `ignore_eos`
(fixed output lengths), vLLM's `min_tokens`, and `stream_options.continuous_usage_stats` (token
counts in every chunk). The tiny model is biased so that its end token is always the most likely
one: without them every answer is empty; with `ignore_eos` each row runs to its own max_tokens,
with `min_tokens` n it ends right after n tokens, in one batch with rows that stop, and the
logprobs reported are still the model's own (the end token on top)."""

from __future__ import annotations

import httpx
import pytest
import torch

from chainlora.inference.engine import Engine
from chainlora.inference.logprobs import Recorder
from chainlora.inference.stops import EndSuppressor, end_ids
from chainlora.serve import Server, create_app
from chainlora.serve.forward import Forwarder
from conftest import TEXTS, Live, LiveApp, Recording, sse


def end_always_wins(engine: Engine) -> None:
    """Add +50 to the end tokens' logits: greedy decoding ends every answer at once."""
    ends = sorted(end_ids(engine.tok))

    def hook(module, inputs, out):
        out = out.clone()
        out[..., ends] += 50.0
        return out

    engine.base.model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("tier", ["peft", "pool"])
def test_minimum_lengths_per_row_beside_rows_that_stop(random_lib, tier):
    engine = Engine.load(random_lib, device="cpu", adapters=tier)
    end_always_wins(engine)
    ends = end_ids(engine.tok)
    recorder = Recorder({0: 2}, 4)
    answers = engine.generate([*TEXTS, TEXTS[0]], task=["antonym", "sentiment", None, "mixed"],
                              max_new_tokens=[5, 5, 3, 6], min_tokens=[5, 0, 3, 2], recorder=recorder,
                              prefill_chunk=4)  # rows 0 and 2: ignore_eos (minimum = max); row 3: min_tokens 2
    assert [a.completion_tokens for a in answers] == [5, 0, 3, 2]
    assert [a.finish_reason for a in answers] == ["length", "stop", "length", "stop"]
    assert not any(t in ends for a in answers for t in a.token_ids if not a.ended)
    for e in answers[0].logprobs:  # raw logits: the end token stays the most likely, never chosen
        assert e.top[0][0] in ends and e.token not in ends and e.logprob < e.top[0][1] - 10


def test_end_suppressor_masks_only_its_rows_after_a_prefill_dropped_some():
    scores = torch.zeros(2, 6)
    s = EndSuppressor({0: 9, 2: 2}, {1, 4})
    s.select([1, 2])  # row 0 left in the prefill: the call's rows are batch rows 1 and 2
    out = s(torch.zeros(2, 7), scores)  # the first step: nothing made yet
    assert out[0].eq(0).all() and out[1, [1, 4]].eq(float("-inf")).all() and out[1, [0, 2, 3, 5]].eq(0).all()
    assert scores.eq(0).all()  # the caller's tensor is left as it was
    assert s(torch.zeros(2, 8), scores)[1, [1, 4]].eq(float("-inf")).all()  # one token made: row 2 needs 2
    assert s(torch.zeros(2, 9), scores).eq(0).all()  # two made: its end tokens are free again


@pytest.fixture(scope="module")
def biased(random_lib):
    engine = Engine.load(random_lib, device="cpu")
    end_always_wins(engine)
    srv = Live(Server(engine, max_batch=8, window_ms=30))
    yield srv
    srv.close()


def test_server_ignore_eos_and_continuous_usage(biased):
    body = {"model": "antonym", "messages": [{"role": "user", "content": TEXTS[0]}], "temperature": 0}
    plain = httpx.post(f"{biased.url}/v1/chat/completions", json={**body, "max_tokens": 6}, timeout=60).json()
    assert plain["usage"]["completion_tokens"] == 0 and plain["choices"][0]["finish_reason"] == "stop"
    whole = httpx.post(f"{biased.url}/v1/chat/completions", timeout=60,
                       json={**body, "max_completion_tokens": 6, "ignore_eos": True, "stop": None}).json()
    assert whole["usage"]["completion_tokens"] == 6 and whole["choices"][0]["finish_reason"] == "length"
    least = httpx.post(f"{biased.url}/v1/chat/completions", timeout=60, json={**body, "max_tokens": 6, "min_tokens": 3}).json()
    assert least["usage"]["completion_tokens"] == 3 and least["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(f"{biased.url}/v1/chat/completions", timeout=60, json={**body, "max_tokens": 2, "min_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    r = httpx.post(f"{biased.url}/v1/chat/completions", timeout=60, json={
        **body, "max_completion_tokens": 6, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = [c for c in sse(r) if c != "[DONE]"]
    made = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"] for c in chunks)
    assert made == sorted(made) and made[-1] == 6 and chunks[-1]["choices"] == []
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    bare = httpx.post(f"{biased.url}/v1/completions", timeout=60, json={
        "model": "antonym", "prompt": TEXTS[0], "max_tokens": 3, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    assert all("usage" not in c for c in sse(bare)[:-2] if c != "[DONE]")  # only when asked


def test_forwarding_passes_the_fields(random_lib):
    rec = Recording()
    backend = LiveApp(rec.app())
    front = Server(Engine.load(random_lib, device="cpu"), forwarder=Forwarder(backend.url))
    app = LiveApp(create_app(front))
    try:
        r = httpx.post(f"{app.url}/v1/chat/completions", timeout=60, json={
            "model": "antonym", "messages": [{"role": "user", "content": TEXTS[0]}], "max_tokens": 4,
            "ignore_eos": True, "min_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        assert r.status_code == 200
        sent = rec.calls[-1][1]
        assert sent["ignore_eos"] is True and sent["min_tokens"] == 2
        assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
        httpx.post(f"{app.url}/v1/completions", timeout=60, json={"model": "antonym", "prompt": "x", "max_tokens": 2})
        assert "ignore_eos" not in rec.calls[-1][1]  # unset: not sent
    finally:
        app.close()
        backend.close()
        front.scheduler.close()


# --------------------------------------------------------------------------- bench/serve_load.py's arithmetic


def _bench():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    import serve_load
    import serve_load_report

    return serve_load, serve_load_report


def _row(system: str, traffic: str, rate: float, p99: float, tok: float, errors: int = 0) -> dict:
    pct = {"p50": p99 / 2, "p90": p99, "p99": p99}
    return {"session": "s", "system": system, "traffic": traffic, "rate": rate, "errors": errors, "completed": 10,
            "cut": 1, "completed_per_s": rate, "output_tokens_per_s": tok, "ttft_s": pct, "itl_s": pct, "e2e_s": pct}


def test_sustainable_rate_is_the_last_rate_before_the_first_miss():
    _, report = _bench()
    rows = [_row("pool", "chain", r, p, 1.0) for r, p in ((1, 0.5), (2, 1.9), (3, 2.5), (4, 1.0))]
    assert report.sustainable(rows, 2.0) == 2  # 4 req/s under 2 s after a miss at 3 does not count
    assert report.sustainable([_row("pool", "chain", 1, 0.1, 1.0, errors=1)], 2.0) == 0
    rows += [_row("pool", "pinned", r, 0.4, 10.0) for r in (1, 2, 3, 4)]
    rows += [_row("llamacpp-f32", "chain", r, p, 5.0) for r, p in ((1, 1.0), (2, 3.0))]
    text = report.summary(rows, 2.0)
    assert "1: 0.100, 2: 0.100, 3: 0.100, 4: 0.100" in text and "2 / 1 = 2.00x" in text


def test_rows_of_reads_guidellms_report():
    load, _ = _bench()

    def metric(p50, p90, p99, total=0.0):
        return {"successful": {"percentiles": {"p50": p50, "p90": p90, "p99": p99}, "total_sum": total}}

    bench = {"duration": 10.0, "config": {"strategy": {"rate": 2.0}}, "metrics": {
        "request_totals": {"successful": 18, "incomplete": 2, "errored": 0},
        "output_token_count": metric(16, 16, 16, total=288), "prompt_token_count": metric(29, 33, 36),
        "time_to_first_token_ms": metric(100, 200, 400), "inter_token_latency_ms": metric(50, 60, 70),
        "request_latency": metric(1.0, 1.5, 2.0)}}
    (row,) = load.rows_of({"benchmarks": [bench]}, "pool", "chain", "s")
    assert row["output_tokens_per_s"] == 28.8 and row["completed_per_s"] == 1.8 and row["rate"] == 2.0
    assert row["ttft_s"] == {"p50": 0.1, "p90": 0.2, "p99": 0.4} and row["e2e_s"]["p99"] == 2.0
