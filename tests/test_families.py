"""Beyond llama: the whole path on tiny Gemma 3 and Qwen 2 models built from a config.

Gemma 3 brings sliding-window layers (a window of 8 tokens here, so prompts and answers cross
it), q/k norms, scaled and tied embeddings, a tokenizer that adds BOS itself and, here, a chat
template without a system role (as Gemma 2's). Qwen 2 brings q/k/v biases and, here, no chat
template at all (the plain prompt). Each family is trained by `train_library`, answered by both
engine tiers with logprobs equal to a plain PEFT forward, served (chain, pinned, streamed) and
exported (peft, merged, vllm). The real Gemma 3 270M runs in tests/test_second_family.py.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from chainlora.data import prompts
from chainlora.errors import ChainloraError
from chainlora.inference.answers import BASE
from chainlora.inference.engine import Engine
from chainlora.inference.logprobs import Recorder
from chainlora.serve import Server
from chainlora.train.recipe import train_library
from conftest import NO_SYSTEM_TEMPLATE, Live, make_tiny_model, sse, tiny_config
from test_logprobs import TOL, Reference

FAMILIES = {"gemma3": NO_SYSTEM_TEMPLATE, "qwen2": False}
LONG = "Give the antonym of the word hot, and then say what a dog is a kind of, please."


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family name, model dir, a trained library) per family."""
    name = request.param
    model_dir = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{name}"), family=name,
                                chat_template=FAMILIES[name])
    lib = train_library(tiny_config(model_dir, "system_prompt=Answer briefly."),
                        tmp_path_factory.mktemp(f"lib-{name}") / "lib")
    return name, model_dir, lib


@pytest.mark.parametrize("tier", ["peft", "pool"])
def test_trained_family_answers_as_plain_peft(family, tier):
    """A batch of a pinned task, the mixed adapter, a routed row and the base model, prefilled in
    chunks of 4 across the sliding window: every logprob equals a plain PeftModel forward's."""
    _, _, lib = family
    engine = Engine.load(lib, device="cpu", adapters=tier)
    reference = Reference(lib)
    texts = [LONG, "Is the word happy positive or negative?", "What rhymes with cat?", LONG]
    answers = engine.generate(texts, task=["antonym", "mixed", None, BASE], max_new_tokens=12,
                              recorder=Recorder({i: 1 for i in range(4)}, 4),
                              prompt_logprobs=[1, 1, 1, 1], prefill_chunk=4)
    for a in answers:
        assert len(a.prompt_ids) + len(a.token_ids) > 8  # the window is crossed
        ref = reference(a.route.adapter or BASE, a.prompt_ids + a.token_ids)
        got = torch.tensor([e.logprob for e in a.prompt_logprobs[1:] + a.logprobs])
        assert torch.allclose(got, ref, atol=TOL), (a.route.adapter, (got - ref).abs().max())


def test_prompts_follow_the_family(family):
    """Gemma (a tokenizer that adds BOS itself, a template without a system role): one BOS, the
    system prompt opens the user turn. Qwen 2 without a template: the plain prompt, no BOS."""
    name, _, lib = family
    engine = Engine.load(lib, device="cpu")
    rendered = engine.render(["hi"])[0]
    ids = prompts.ids(engine.tok, rendered)
    if name == "gemma3":
        assert rendered == "<bos><|im_start|>user\nAnswer briefly.\n\nhi<|im_end|>\n<|im_start|>model\n"
        assert ids.count(engine.tok.bos_token_id) == 1 and ids[0] == engine.tok.bos_token_id
    else:
        assert rendered == "Answer briefly.\n\n### Instruction:\nhi\n\n### Response:\n"


def test_plain_prompt_opens_with_bos_when_the_tokenizer_adds_one(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "g", family="gemma3", chat_template=False))
    rendered = prompts.render(tok, "hi")
    assert rendered == "<bos>### Instruction:\nhi\n\n### Response:\n"
    assert prompts.ids(tok, rendered)[0] == tok.bos_token_id == tok("hi")["input_ids"][0]


def test_system_prompt_is_folded_once_with_a_note(tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "g", family="gemma3",
                                                        chat_template=NO_SYSTEM_TEMPLATE))
    chat = [{"role": "system", "content": "S."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    out = prompts.render_chat(tok, chat)
    assert out == ("<bos><|im_start|>user\nS.\n\na<|im_end|>\n<|im_start|>model\nb<|im_end|>\n"
                   "<|im_start|>user\nc<|im_end|>\n<|im_start|>model\n")
    prompts.render(tok, "x", "S.")
    assert capsys.readouterr().err.count("no system role") == 1
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"  # refused with or without a system turn
    with pytest.raises(ChainloraError, match="chat template refused the conversation: roles must alternate"):
        prompts.render_chat(tok, chat)


def test_family_is_served_chain_pinned_and_streamed(family):
    _, _, lib = family
    live = Live(Server(Engine.load(lib, device="cpu"), max_batch=8, window_ms=20))
    try:
        url = f"{live.url}/v1/chat/completions"
        for model in ("chain", "sentiment"):
            body = {"model": model, "messages": [{"role": "user", "content": LONG}], "max_tokens": 10,
                    "temperature": 0}
            whole = httpx.post(url, json=body, timeout=60).json()
            route = whole["choices"][0]["chainlora"] if "chainlora" in whole["choices"][0] else whole["chainlora"]
            assert model == "chain" or route["adapter"] == model
            chunks = sse(httpx.post(url, json={**body, "stream": True}, timeout=60))
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
            assert chunks[-1] == "[DONE]" and text == whole["choices"][0]["message"]["content"]
    finally:
        live.close()


def test_family_exports(family, tmp_path, cli):
    """peft and vllm write loadable adapter directories; merged equals the adapter's logits
    (tied embeddings stay tied)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, model_dir, lib = family
    for fmt in ("peft", "vllm"):
        r = cli("export", str(lib), "--format", fmt, "--out", str(tmp_path / fmt))
        assert r.returncode == 0, r.stderr
    r = cli("export", str(lib), "--format", "merged", "--adapter", "antonym", "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    ids = torch.tensor([list(range(3, 20))])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(lib / "tasks/antonym")).eval()
    with torch.no_grad():
        assert (merged(ids).logits - ref(ids).logits).abs().max() <= 1e-5
    assert json.loads((tmp_path / "merged/config.json").read_text()).get("tie_word_embeddings", True)


def test_target_modules_are_checked_against_the_models_own_layers(tmp_path, cli):
    """A name the model lacks is refused in one line listing the names it has; all-linear adapts
    every Linear but the output head, and the adapter says which."""
    from conftest import TINY

    model_dir = make_tiny_model(tmp_path / "q", family="qwen2", chat_template=False)
    r = cli("train", str(TINY), "--out", str(tmp_path / "bad"), "--set", f"base_model={model_dir}",
            "--set", "lora.target_modules=[c_attn]", "--progress", "none")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "lora.target_modules: 'c_attn' is not a layer of Qwen2ForCausalLM" in r.stderr
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in r.stderr
    lib = train_library(tiny_config(model_dir, "lora.target_modules=[all-linear]", "tasks=[antonym, rhyme]",
                                    "classifier.enabled=false"), tmp_path / "lib")
    adapted = json.loads((lib / "tasks/antonym/adapter_config.json").read_text())["target_modules"]
    assert {m.rsplit(".", 1)[-1] for m in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"}
    for tier in ("peft", "pool"):  # every Linear adapted: both tiers answer as plain PEFT
        engine, reference = Engine.load(lib, device="cpu", adapters=tier), Reference(lib)
        [a] = engine.generate([LONG], task="rhyme", max_new_tokens=4, recorder=Recorder({0: 1}, 1))
        prompt = prompts.ids(engine.tok, engine.render([LONG])[0])
        ref = reference("rhyme", prompt + a.token_ids)[-len(a.token_ids):]
        assert torch.allclose(torch.tensor([e.logprob for e in a.logprobs]), ref, atol=TOL)
