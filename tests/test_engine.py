"""The engine on a tiny model with random adapters: routing, mixed batches, cache, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from chainlora.data import prompts
from chainlora.errors import ChainloraError
from chainlora.inference import label_ranking as router
from chainlora.inference.engine import BASE, Engine

TEXTS = ["Give the antonym of hot.", "Is the word happy positive or negative?",
         "What rhymes with cat?", "What is a dog a kind of?", "Define the word cat.",
         "Translate house into French.", "How is cat pronounced?", "Give the antonym of up."]
TASKS = ["antonym", "sentiment", "rhyme", "hypernym", "definition", "antonym", "rhyme", "sentiment"]


@pytest.fixture(scope="module")
def engine(random_lib):
    return Engine.load(random_lib, device="cpu")


def test_score_selector_probabilities_sum_to_one(engine):
    routes = engine.route(TEXTS, top_k=5)
    for r in routes:
        assert r.task in engine.tasks and r.adapter == r.task and not r.fallback
        probs = [p for _, p in r.top_k]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)
        assert r.probability == probs[0]


def test_score_selector_kv_reuse_equals_full_sequences(engine):
    """The prefill-once KV-cache path gives the same log-probs as scoring full sequences."""
    lib_router = engine.lib.router
    labels = list(lib_router["labels"].values())
    model = engine.cache.acquire(["router"])
    slot = engine.cache.slot("router")
    fast = router.score_labels(model, engine.tok, TEXTS[:3], labels, template=lib_router["task_prompt"],
                               system=None, adapter=slot)
    for i, text in enumerate(TEXTS[:3]):
        prompt = prompts.render(engine.tok, prompts.task_prompt(text, "", lib_router["task_prompt"]))
        p_ids = engine.tok(prompt, add_special_tokens=False)["input_ids"]
        for j, label in enumerate(labels):
            l_ids = engine.tok(label + engine.tok.eos_token, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + l_ids])
            with torch.no_grad():
                logits = model(input_ids=ids, adapter_names=[slot]).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            naive = sum(float(logp[len(p_ids) - 1 + k, t]) for k, t in enumerate(l_ids))
            assert float(fast[i, j]) == pytest.approx(naive, abs=1e-3)


def test_mixed_batch_equals_one_at_a_time(engine):
    batch = engine.generate(TEXTS, task=TASKS, max_new_tokens=12)
    single = [engine.generate([t], task=k, max_new_tokens=12)[0] for t, k in zip(TEXTS, TASKS)]
    assert [a.text for a in batch] == [a.text for a in single]
    assert [a.completion_tokens for a in batch] == [a.completion_tokens for a in single]
    # Not vacuous: the adapters really answer differently from each other.
    other = engine.generate([TEXTS[0]], task="sentiment", max_new_tokens=12)[0]
    assert other.text != batch[0].text


def test_routed_answer_equals_pinned_answer(engine):
    routed = engine.generate(TEXTS[:4], max_new_tokens=10)
    pinned = engine.generate(TEXTS[:4], task=[a.route.task for a in routed], max_new_tokens=10)
    assert [a.text for a in routed] == [a.text for a in pinned]
    assert all(a.route.selector == "score" for a in routed)


def test_threshold_falls_back_to_mixed(random_lib, engine):
    strict = Engine.load(random_lib, device="cpu", threshold=1.01)
    (route,) = strict.route(TEXTS[:1])
    assert route.fallback and route.adapter == "mixed" and route.task in engine.tasks
    (answer,) = strict.generate(TEXTS[:1], max_new_tokens=8)
    assert answer.text == engine.generate(TEXTS[:1], task="mixed", max_new_tokens=8)[0].text


def test_generate_selector_uses_only_labels(engine):
    routes = engine.route(TEXTS[:3], selector="generate")
    for r in routes:
        assert r.selector == "generate"
        assert all(t in engine.tasks for t, _ in r.top_k)
        assert r.fallback == (r.task is None)


def test_stop_strings_and_length(engine):
    """min_new_tokens forces a 16-token answer (no end token can come first), so the answer is
    long enough to cut, and running out of tokens is finish_reason "length"."""
    (full,) = engine.generate(TEXTS[:1], task="antonym", max_new_tokens=16, min_new_tokens=16)
    assert full.finish_reason == "length" and full.completion_tokens == 16
    assert len(full.text) > 6, full.text
    stop = full.text[3:6]
    (cut,) = engine.generate(TEXTS[:1], task="antonym", max_new_tokens=16, min_new_tokens=16,
                             stop=["never in any answer \x00", stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)].strip()  # cut at the earliest stop
    (short,) = engine.generate(TEXTS[:1], task="antonym", max_new_tokens=4, min_new_tokens=4)
    assert short.finish_reason == "length" and short.completion_tokens == 4


def test_stream_matches_generate(engine):
    route, pieces = engine.stream(TEXTS[2], task="rhyme", max_new_tokens=12)
    assert route.adapter == "rhyme"
    streamed = "".join(pieces).strip()
    assert streamed == engine.generate([TEXTS[2]], task="rhyme", max_new_tokens=12)[0].text


def test_stream_cuts_at_stop_strings_like_generate(engine):
    (full,) = engine.generate([TEXTS[2]], task="rhyme", max_new_tokens=12, min_new_tokens=12)
    stop = full.text[4:7]
    (cut,) = engine.generate([TEXTS[2]], task="rhyme", max_new_tokens=12, stop=[stop])
    _, pieces = engine.stream(TEXTS[2], task="rhyme", max_new_tokens=12, stop=[stop])
    pieces = list(pieces)
    assert "".join(pieces).strip() == cut.text and not any(stop in p for p in pieces)


def test_stream_ends_with_the_error_when_generate_fails(engine, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    def broken(names):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine, "model_for", broken)
    _, pieces = engine.stream(TEXTS[2], task="rhyme", max_new_tokens=12)
    with ThreadPoolExecutor(1) as pool:  # a hang here is the bug: bounded by the result's timeout
        future = pool.submit(list, pieces)
        with pytest.raises(RuntimeError, match="out of memory"):
            future.result(timeout=120)


def test_sampling_runs(engine):
    torch.manual_seed(0)
    (a,) = engine.generate(TEXTS[:1], task="antonym", max_new_tokens=8, temperature=0.8, top_p=0.9)
    assert a.completion_tokens >= 1


def test_lru_cache_evicts_and_reloads_from_memory(random_lib, engine):
    small = Engine.load(random_lib, device="cpu")
    size = next(iter(small.cache.resident.values()))
    small.cache.device_bytes = 3 * size  # router + 2 task adapters fit
    first = small.generate(TEXTS[:2], task=TASKS[:2], max_new_tokens=8)
    mid = small.generate(TEXTS[2:4], task=TASKS[2:4], max_new_tokens=8)  # evicts the first two
    assert [a.text for a in mid] == [a.text for a in engine.generate(TEXTS[2:4], task=TASKS[2:4], max_new_tokens=8)]
    assert small.cache.stats.evictions >= 2 and "router" in small.cache.resident
    disk = small.cache.stats.disk_loads
    again = small.generate(TEXTS[:2], task=TASKS[:2], max_new_tokens=8)
    assert [a.text for a in again] == [a.text for a in first]
    assert small.cache.stats.disk_loads == disk  # came back from the CPU tier
    assert small.cache.stats.hotswaps >= 2  # into the slots of evicted adapters (same LoRA shape)
    assert len(small.cache.model.peft_config) == len(small.cache.resident)  # no orphan slots
    small.generate(TEXTS[:2], task=TASKS[:2], max_new_tokens=8)  # both resident now: hits
    assert small.cache.stats.hits == 2 and small.cache.stats.misses == 7


def test_bad_input(engine):
    with pytest.raises(ChainloraError, match="instruction 2: empty"):
        engine.generate(["ok", "  "])
    with pytest.raises(ChainloraError, match="unknown task 'telepathy' \\(tasks: antonym,"):
        engine.generate(["ok"], task="telepathy")
    limit = engine.base.model.config.max_position_embeddings
    with pytest.raises(ChainloraError, match=f"exceed the model's context of {limit}"):
        engine.generate(["word " * limit])
    with pytest.raises(ChainloraError, match="selector: unknown 'magic'"):
        engine.route(["ok"], selector="magic")


def test_corrupt_adapter_is_refused_by_name_others_work(random_lib, tmp_path, tiny_model_dir):
    lib = tmp_path / "lib"
    shutil.copytree(random_lib, lib)
    weights = lib / "tasks/rhyme/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x07")
    (lib / "tasks/hypernym/adapter_model.safetensors").unlink()
    engine = Engine.load(lib, device="cpu")
    with pytest.raises(ChainloraError, match="tasks/rhyme/adapter_model.safetensors: adapter 'rhyme' is corrupt"):
        engine.generate(["What rhymes with cat?"], task="rhyme")
    with pytest.raises(ChainloraError, match="adapter 'hypernym' is missing"):
        engine.generate(["What is a dog?"], task="hypernym")
    (ok,) = engine.generate(["Give the antonym of hot."], task="antonym", max_new_tokens=4)
    assert ok.route.adapter == "antonym"


def test_fallback_without_mixed_uses_the_base_model(random_lib, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(random_lib, lib)
    manifest = json.loads((lib / "chainlora.json").read_text())
    manifest["mixed"] = None
    (lib / "chainlora.json").write_text(json.dumps(manifest))
    engine = Engine.load(lib, device="cpu", threshold=1.01)
    answers = engine.generate(TEXTS[:2], max_new_tokens=8)
    assert all(a.route.fallback and a.route.adapter == BASE for a in answers)
    model = engine.cache.model
    enc = engine._inputs(engine.render(TEXTS[:2]))
    with torch.no_grad(), model.disable_adapter():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=engine.tok.pad_token_id)
    plain = [engine._answer(row, answers[0].route, 0, None).text for row in out[:, enc["input_ids"].shape[1]:]]
    assert [a.text for a in answers] == plain


def test_shared_tokenizer_is_never_flipped(engine):
    """Padding side is passed per call (left for generation, right for scoring and training):
    the one tokenizer the engine, selectors and evaluation share keeps its own setting."""
    from chainlora.data import Record
    from chainlora.eval import evaluate

    side = engine.tok.padding_side
    for other in ("left", "right"):
        engine.tok.padding_side = other
        engine.route(TEXTS[:2])
        engine.generate(TEXTS[:2], task="antonym", max_new_tokens=2)
        per = evaluate.record_nll(engine, [Record("antonym", "Give the antonym of hot.", "cold")], "antonym")
        assert engine.tok.padding_side == other and per[0][1] > 0
    engine.tok.padding_side = side
