"""Logprobs that are the answering adapter's own: the engine's (prompt and generated tokens, in
one mixed-adapter batch, both device tiers, chunked prefill) checked against a plain PEFT
`PeftModel` forward on the same ids; the server's OpenAI fields (completions with echo and
lists of token-id prompts as lm-evaluation-harness sends them, chat with top_logprobs,
streaming), their refusals, and forwarding."""

from __future__ import annotations

import httpx
import pytest
import torch

from chainlora.inference.answers import BASE
from chainlora.inference.engine import Engine
from chainlora.inference.logprobs import Recorder
from chainlora.serve import Server, create_app
from chainlora.serve.forward import Forwarder
from conftest import TEXTS, Live, LiveApp, error_of, make_tiny_model, sse

TOL = 1e-4


class Reference:
    """Log-probabilities from a plain PeftModel (or the bare base model) per adapter."""

    def __init__(self, lib_root):
        from chainlora.base_model import load_base
        from chainlora.library.store import Library

        self.lib = Library.open(lib_root, verify=False)
        self.base = load_base(self.lib.manifest["base_model"]["name"], device="cpu")

    def __call__(self, adapter: str, ids: list[int]) -> torch.Tensor:
        """logprob of ids[j] given ids[:j], for j >= 1."""
        from peft import PeftModel

        path = {e["name"]: e["path"] for e in self.lib.entries()}.get(adapter)
        model = self.base.model if adapter == BASE else PeftModel.from_pretrained(self.base.model, str(self.lib.root / path))
        try:
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        finally:
            if adapter != BASE:
                self.base.model = model.unload()
        return lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def reference(random_lib):
    return Reference(random_lib)


@pytest.fixture(scope="module")
def live(random_lib):
    srv = Live(Server(Engine.load(random_lib, device="cpu"), max_batch=16, window_ms=30))
    yield srv
    srv.close()


def ids_of(engine: Engine, text: str) -> list[int]:
    return engine.tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("tier", ["peft", "pool"])
def test_engine_logprobs_are_a_plain_peft_forwards(random_lib, reference, tier):
    """One batch: a pinned task, the mixed adapter, a routed row and the base model, prefilled in
    chunks of 4; every prompt and generated token's logprob equals the plain model's."""
    engine = Engine.load(random_lib, device="cpu", adapters=tier)
    texts = [*TEXTS, "Define the word lexicon."]
    recorder = Recorder({0: 3, 1: 0, 2: 2, 3: 1}, 4)
    answers = engine.generate(texts, task=["antonym", "mixed", None, BASE], max_new_tokens=[5, 3, 2, 4],
                              recorder=recorder, prompt_logprobs=[2, 1, 0, 3], prefill_chunk=4)
    for text, a in zip(texts, answers):
        prompt = ids_of(engine, engine.render([text])[0])
        assert a.prompt_ids == prompt and a.prompt_logprobs[0] is None and len(a.prompt_logprobs) == len(prompt)
        assert len(a.logprobs) == len(a.token_ids) > 0
        ref = reference(a.route.adapter, prompt + a.token_ids)
        got = torch.tensor([e.logprob for e in a.prompt_logprobs[1:] + a.logprobs])
        assert torch.allclose(got, ref, atol=TOL), (a.route.adapter, (got - ref).abs().max())
        for e in a.logprobs:  # greedy: the chosen token is the most likely one
            assert not e.top or (e.top[0][0] == e.token and abs(e.top[0][1] - e.logprob) < 1e-6)
            assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
    assert [len(answers[0].logprobs[0].top), len(answers[1].logprobs[0].top)] == [3, 0]


def test_lm_eval_loglikelihood_requests(live, reference):
    """What lm-evaluation-harness sends: a list of token-id prompts, max_tokens 1, echo, logprobs 1.
    Each prompt is its own choice (index in order), routed on its own, scored by its adapter:
    one logprob per prompt token (the first null) plus the generated one."""
    from openai import OpenAI

    engine = live.server.engine
    prompts = [ids_of(engine, t) for t in [*TEXTS, "hot and cold"]]
    c = OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=60)
    for model in ("chain", "mixed", "rhyme"):
        out = c.completions.create(model=model, prompt=prompts, max_tokens=1, temperature=0, logprobs=1,
                                   echo=True, seed=1234)
        assert [ch.index for ch in out.choices] == list(range(len(prompts)))
        assert out.usage.prompt_tokens == sum(map(len, prompts))
        for ch, ids in zip(out.choices, prompts):
            lp, route = ch.logprobs, ch.model_extra["chainlora"]
            assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(ids) + 1
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            assert model == "chain" or route["adapter"] == model
            adapter = route["adapter"] or BASE
            ref = reference(adapter, ids)
            assert torch.allclose(torch.tensor(lp.token_logprobs[1:-1]), ref, atol=TOL)
            greedy = lp.top_logprobs[-1]  # temperature 0: the generated token is the most likely
            assert lp.token_logprobs[-1] == max(greedy.values())
            assert "".join(lp.tokens[:-1]) == engine.tok.decode(ids) and ch.text.startswith(engine.tok.decode(ids))


def test_a_text_prompt_echoed_is_scored_as_written(live, reference):
    r = httpx.post(f"{live.url}/v1/completions", json={"model": "antonym", "prompt": "hot and cold", "echo": True,
                                                          "max_tokens": 0, "logprobs": 2}, timeout=60)
    ch = r.json()["choices"][0]
    ids = ids_of(live.server.engine, "hot and cold")
    assert r.status_code == 200 and ch["text"] == "hot and cold" and "".join(ch["logprobs"]["tokens"]) == "hot and cold"
    assert r.json()["usage"]["completion_tokens"] == 0 and len(ch["logprobs"]["tokens"]) == len(ids)
    assert torch.allclose(torch.tensor(ch["logprobs"]["token_logprobs"][1:]), reference("antonym", ids), atol=TOL)
    assert all(len(top) in (2, 3) for top in ch["logprobs"]["top_logprobs"][1:])  # the top 2 and the chosen one
    offsets = ch["logprobs"]["text_offset"]
    assert offsets == [sum(len(t) for t in ch["logprobs"]["tokens"][:j]) for j in range(len(ids))]


def test_completion_logprobs_cover_the_answer(live, reference):
    """Without echo: one entry per generated token (the end token last when one ended it), the
    chat template applied as for any answer."""
    engine = live.server.engine
    r = httpx.post(f"{live.url}/v1/completions", json={"model": "sentiment", "prompt": TEXTS[1], "max_tokens": 6,
                                                          "temperature": 0, "logprobs": 1}, timeout=60).json()
    ch, lp = r["choices"][0], r["choices"][0]["logprobs"]
    ended = ch["finish_reason"] == "stop"
    assert len(lp["tokens"]) == r["usage"]["completion_tokens"] + ended
    prompt = ids_of(engine, engine.render([TEXTS[1]])[0])
    (a,) = engine.generate([TEXTS[1]], task="sentiment", max_new_tokens=6, recorder=Recorder({0: 1}, 1))
    assert [e.logprob for e in a.logprobs] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    ref = reference("sentiment", prompt + a.token_ids)[len(prompt) - 1:]
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), ref, atol=TOL)


def test_chat_logprobs_streamed_join_to_the_whole_answers(live):
    body = {"model": "antonym", "messages": [{"role": "user", "content": TEXTS[0]}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    content = whole["logprobs"]["content"]
    assert content and all(set(x) == {"token", "logprob", "bytes", "top_logprobs"} for x in content)
    assert all(len(x["top_logprobs"]) == 2 and x["top_logprobs"][0]["logprob"] == x["logprob"] for x in content)
    assert bytes(b for x in content for b in x["bytes"]).decode().strip() == whole["message"]["content"]
    events = sse(httpx.post(f"{live.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60))
    streamed = [x for e in events[:-1] for ch in e["choices"] for x in (ch["logprobs"] or {}).get("content", [])]
    assert streamed == content and events[-1] == "[DONE]"
    text = "".join(ch["delta"].get("content", "") for e in events[:-1] for ch in e["choices"])
    assert text == whole["message"]["content"]


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"echo": True, "stream": True}, "echo"),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, "stream"),
    ("/v1/completions", {"prompt": ["a"] * 65}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [10**6]]}, "prompt[1]"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_refusals_name_the_field(live, path, extra, param):
    body = {"model": "chain", **({"prompt": "hi"} if "completions" in path and "chat" not in path
                                 else {"messages": [{"role": "user", "content": "hi"}]}), "max_tokens": 2, **extra}
    r = httpx.post(f"{live.url}{path}", json=body, timeout=60)
    assert r.status_code == 400 and error_of(r)["param"] == param, r.text


def test_forwarded_logprobs_are_the_backends(live):
    """A chainlora front forwarding to this server: echo and logprobs go through, chat's come
    back in chat's shape; a llama-server backend refuses echo with one 400."""
    from chainlora.serve.llamacpp import LlamaCppForwarder

    engine = live.server.engine
    front = Server(Engine.load(engine.lib.root, device="cpu"), forwarder=Forwarder(live.url))
    app = LiveApp(create_app(front))
    try:
        body = {"model": "antonym", "prompt": "hot and cold", "echo": True, "max_tokens": 2, "logprobs": 1,
                "temperature": 0}
        direct = httpx.post(f"{live.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        via = httpx.post(f"{app.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        assert via["logprobs"] == direct["logprobs"] and via["text"] == direct["text"]
        chat = {"model": "antonym", "messages": [{"role": "user", "content": TEXTS[0]}], "max_tokens": 4,
                "temperature": 0, "logprobs": True, "top_logprobs": 1}
        d = httpx.post(f"{live.url}/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]["logprobs"]
        v = httpx.post(f"{app.url}/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]["logprobs"]
        strip = [(x["logprob"], [t["logprob"] for t in x["top_logprobs"]]) for x in d["content"]]
        assert [(x["logprob"], [t["logprob"] for t in x["top_logprobs"]]) for x in v["content"]][:len(strip)] == strip
    finally:
        app.close()
        front.scheduler.close()
    llama = Server(Engine.load(engine.lib.root, device="cpu"),
                   forwarder=LlamaCppForwarder("http://127.0.0.1:9", ["antonym"]))
    app = LiveApp(create_app(llama))
    try:
        r = httpx.post(f"{app.url}/v1/completions", json={**body, "model": "antonym"}, timeout=60)
        assert r.status_code == 400 and error_of(r)["param"] == "echo"
    finally:
        app.close()
        llama.scheduler.close()


def test_a_token_prompt_in_the_chat_template_is_routed_by_its_user_message(live, tiny_model_dir):
    """What lm-eval sends for a rendered prompt (context + continuation as ids): routed by the
    user message inside it, as the same chat request is; other ids by their decoded text."""
    from chainlora.data import prompts

    engine = live.server.engine
    for text in TEXTS:
        ids = ids_of(engine, engine.render([text])[0] + "cold")
        r = httpx.post(f"{live.url}/v1/completions", json={"model": "chain", "prompt": ids, "max_tokens": 1,
                                                              "echo": True, "logprobs": 0}, timeout=60)
        assert r.json()["choices"][0]["chainlora"] == engine.route([text])[0].as_dict()
        assert prompts.token_prompt_text(engine.tok, ids, engine.system) == text
    raw = ids_of(engine, "Word: hot\nAntonym:")
    assert prompts.token_prompt_text(engine.tok, raw, engine.system) == "Word: hot\nAntonym:"
    plain = make_tiny_model(tiny_model_dir.parent / "plain-model", chat_template=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plain)
    ids = tok(prompts.render(tok, TEXTS[0], "Be brief.") + "cold", add_special_tokens=False)["input_ids"]
    assert prompts.token_prompt_text(tok, ids, "Be brief.") == TEXTS[0]
