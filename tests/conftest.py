"""Shared test fixtures.

Tests run offline on CPU. Fast unit tests use a tiny Llama built from a config with a small
byte-level BPE tokenizer trained here; tests marked `e2e` use the real default model, converted
ONCE per run into a session cache directory (set CHAINLORA_TEST_HOME to reuse one across runs).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per test process (and its subprocesses) unless the caller says otherwise: with
# two threads and the other core busy, every parallel region waits for the descheduled thread
# (seen here: `chainlora demo --quick` still evaluating after 54 min with one core busy, where the
# whole suite took 15.5 min on the idle machine). Tests check behaviour, not speed: bench/.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# Subprocess time bounds catch hangs only, never slowness: several times the measured time (the
# slowest, `chainlora demo --quick`, takes a few minutes), so a busy machine cannot turn a
# correct run red. Speed goals live in bench/.
HANG_S = 3600
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_TEXT = [
    "Give the antonym of the word hot. cold. Translate house into French: maison.",
    "What is a dog a kind of? animal. Define the word cat: a small domesticated feline.",
    "Is the word happy positive or negative? positive. How is cat pronounced? K AE1 T.",
    "Classify the instruction below by the task it asks for. Answer with the task name only.",
] * 20


@pytest.fixture(scope="session", autouse=True)
def chainlora_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test writes its cache here, never to the user's ~/.cache."""
    home = Path(os.environ.get("CHAINLORA_TEST_HOME") or tmp_path_factory.mktemp("chainlora-home"))
    os.environ["CHAINLORA_HOME"] = str(home)
    return home


# A template without a system role, as Gemma 2's: it raises on one (chainlora folds it into the user turn).
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
)


def make_tiny_model(directory: Path, *, chat_template: bool | str = True, pad_token: bool = False,
                    family: str = "llama") -> Path:
    """Save a tiny random model plus a trained byte-level BPE tokenizer to `directory`.

    family: "llama" (the default everywhere), "gemma3" (sliding-window layers with a window of 8
    tokens so prompts cross it, q/k norms, scaled embeddings; a tokenizer that adds BOS itself, as
    Gemma's does) or "qwen2" (q/k/v biases). chat_template: True (ChatML), False, or a template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos = family == "gemma3"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<bos>"] if bos else [])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TOKENIZER_TEXT, trainer)
    if bos:
        bpe.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bpe.token_to_id("<bos>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<bos>" if bos else None,
                                  pad_token="<|endoftext|>" if pad_token else None)
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE if chat_template is True else chat_template
    torch.manual_seed(0)
    model = _tiny_model_class(family)(tiny_family_config(family, len(tok), tok.eos_token_id, tok.bos_token_id))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def tiny_family_config(family: str, vocab: int, eos: int, bos: int | None):
    """A two-layer config of `family`, small enough for a test, every feature of the family on."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=eos, tie_word_embeddings=True)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"], bos_token_id=bos,
                                pad_token_id=None)
    raise ValueError(f"unknown tiny family {family!r}")


def _tiny_model_class(family: str):
    from transformers import Gemma3ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM

    return {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gemma3": Gemma3ForCausalLM}[family]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def default_base():
    """The real default model (SmolLM2-135M), converted once per run."""
    from chainlora.base_model import load_base

    return load_base()


@pytest.fixture
def cli():
    """Run the installed `chainlora` console script in a subprocess (real exit codes, stderr)."""
    import subprocess

    def run(*args: str, env: dict | None = None, timeout: int = HANG_S) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).with_name("chainlora")
        return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, cwd=REPO)

    return run


def make_random_library(root: Path, model_dir: Path, tasks: list[str], *, router: bool = True,
                        mixed: bool = True, r: int = 4, configs: dict | None = None) -> Path:
    """A library of RANDOM LoRA adapters (B != 0) on `model_dir`: every adapter changes the
    outputs visibly, so engine tests cannot pass by accident. Written with chainlora.library.
    configs: LoraConfig fields per adapter name that replace the defaults (rank, targets, ...)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from chainlora import library
    from chainlora.data.prompts import DEFAULT_TASK_PROMPT
    from chainlora.base_model import load_base

    base = load_base(str(model_dir), device="cpu")
    manifest = library.new_manifest(str(model_dir), base.fingerprint, {}, "test", None)
    names = list(tasks) + (["router"] if router else []) + (["mixed"] if mixed else [])
    for i, name in enumerate(names):
        torch.manual_seed(1000 + i)
        cfg = LoraConfig(**{"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
                            "init_lora_weights": False, "task_type": "CAUSAL_LM", **(configs or {}).get(name, {})})
        model = get_peft_model(base.model, cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        path = library.task_path(name) if name in tasks else name
        entry = {"name": name, "path": path, "sha256": library.save_adapter(model, root, path)}
        base.model = model.unload()
        if name in tasks:
            manifest["tasks"].append({**entry, "label": name})
        elif name == "router":
            manifest["router"] = {**entry, "kind": "lora", "selector": "score",
                                  "task_prompt": DEFAULT_TASK_PROMPT, "labels": {t: t for t in tasks}}
        else:
            manifest["mixed"] = entry
    manifest["complete"] = True
    library.write_manifest(root, manifest)
    return root


@pytest.fixture(scope="session")
def random_lib(tiny_model_dir, tmp_path_factory) -> Path:
    return make_random_library(tmp_path_factory.mktemp("rlib") / "lib", tiny_model_dir,
                               ["antonym", "sentiment", "rhyme", "hypernym", "definition"])


class LiveApp:
    """An ASGI app served by uvicorn on a free loopback port, in a thread (tests only)."""

    def __init__(self, app, limits=None):
        """`limits` (chainlora.serve.limits.Limits): serve with chainlora's own connection
        protocol (header deadline, connection cap, keep-alive), as `chainlora serve` does."""
        import socket
        import threading
        import time

        import uvicorn

        from chainlora.serve.connections import uvicorn_config

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.port = self.sock.getsockname()[1]
        config = (uvicorn_config(app, limits, log_level="warning", lifespan="on") if limits is not None
                  else uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def live_app():
    """Start ASGI apps on loopback for one test: live_app(app) -> LiveApp (closed afterwards)."""
    started = []

    def start(app) -> LiveApp:
        started.append(LiveApp(app))
        return started[-1]

    yield start
    for a in started:
        a.close()


# --------------------------------------------------------------------------- tiny training runs

TINY = REPO / "configs" / "tiny.yaml"
TASKS = ["antonym", "sentiment", "rhyme"]


def tiny_config(model_dir: Path, *extra: str):
    """configs/tiny.yaml on the tiny model, with `--set`-style overrides."""
    from chainlora.train import config

    return config.load(TINY, overrides=[f"base_model={model_dir}", *extra])


def write_data(directory: Path, tasks: list[str]) -> tuple[Path, Path]:
    """A train and a test JSONL file of a few demo records per task (the files are the split)."""
    from chainlora.data import load_demo

    demo = load_demo()
    paths = directory / "train.jsonl", directory / "test.jsonl"
    for path, split, n in ((paths[0], "train", 16), (paths[1], "test", 4)):
        rows = [{"task": t, "instruction": r.instruction, "input": r.input, "output": r.output}
                for t in tasks for r in getattr(demo[t], split)[:n]]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def cfg_for(model_dir: Path, data: tuple[Path, Path], tasks: list[str], *extra: str) -> Any:
    """configs/tiny.yaml on the tiny model and these data files and tasks."""
    from chainlora.train import config

    return config.load(TINY, overrides=[f"base_model={model_dir}", f"data.train={data[0]}",
                                        f"data.test={data[1]}", f"tasks={json.dumps(tasks)}", *extra])


def files(root: Path) -> dict[str, bytes]:
    """Every adapter file's bytes, by path relative to the library."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.safetensors")
            if not p.relative_to(root).parts[0].startswith(".")}


def plan_lines(out: str) -> dict[str, tuple[str, str]]:
    """{adapter: (action, reason)} from a printed plan."""
    rows = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] in ("keep", "train", "retrain", "remove"):
            rows[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "")
    return rows


# --------------------------------------------------------------------------- serving

import httpx  # noqa: E402  (below the environment set-up above)
from fastapi import Request  # noqa: E402  module level: FastAPI resolves the fake backends' annotations here

TEXTS = ["Give the antonym of hot.", "Is the word happy positive or negative?", "What rhymes with cat?"]


class Live(LiveApp):
    """A chainlora Server on loopback."""

    def __init__(self, server: Any):
        from chainlora.serve import create_app

        self.server = server
        super().__init__(create_app(server))

    def close(self) -> None:
        super().close()
        self.server.scheduler.close()

def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]

def wait_until(cond, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)

def post_in_background(url: str, body: dict, out: dict | None = None) -> threading.Thread:
    """POST from a thread (its response lands in out["r"]); started."""
    def go() -> None:
        r = httpx.post(url, json=body, timeout=60)
        if out is not None:
            out["r"] = r

    t = threading.Thread(target=go)
    t.start()
    return t

async def _load(url: str, n: int, concurrency: int, disconnect_every: int = 0, max_tokens: int = 8,
                models: tuple[str, ...] = ("chain", "antonym", "sentiment", "mixed")) -> dict:
    """n requests, `concurrency` at a time, over 4 models, chat/completions, streaming or not;
    every `disconnect_every`-th streaming client hangs up after its first chunk. `failed`: the
    model of every request that failed."""
    from openai import AsyncOpenAI

    c = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    gate = asyncio.Semaphore(concurrency)
    out = {"ok": 0, "errors": [], "disconnected": 0, "failed": []}

    async def one(i: int) -> None:
        async with gate:
            model, stream = models[i % 4], i % 3 == 0
            try:
                if stream:
                    s = await c.chat.completions.create(model=model, stream=True, max_tokens=max_tokens, temperature=0,
                                                        messages=[{"role": "user", "content": TEXTS[i % 3]}])
                    chunks = 0
                    async for ch in s:
                        assert ch.object == "chat.completion.chunk" and "chainlora" in ch.model_extra
                        chunks += 1
                        if disconnect_every and i % disconnect_every == 0:
                            await s.close()
                            out["disconnected"] += 1
                            return
                    assert chunks >= 2
                else:
                    r = await c.completions.create(model=model, prompt=TEXTS[i % 3], max_tokens=8, temperature=0)
                    assert isinstance(r.choices[0].text, str) and r.model_extra["chainlora"]["adapter"]
                    assert r.usage.completion_tokens <= 8
                out["ok"] += 1
            except Exception as e:  # counted, reported by the test
                out["errors"].append(repr(e))
                out["failed"].append(model)

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout=300)
    await c.close()
    return out


PIECES = ["Hel", "lo", " there"]


class Recording:
    """A fake OpenAI backend: records every request; answers a fixed text completion."""

    def __init__(self, fail_stream: bool = False):
        self.calls: list[tuple[str, dict]] = []
        self.fail_stream = fail_stream

    def app(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, StreamingResponse

        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.calls.append(("/v1/completions", body))
            if body.get("stream") and self.fail_stream:
                return JSONResponse({"error": {"message": "boom", "type": "server_error", "param": None,
                                               "code": None}}, status_code=500)
            if body.get("stream"):
                return StreamingResponse(self.events(body), media_type="text/event-stream")
            return {"id": "cmpl-rec", "object": "text_completion", "created": 1, "model": body["model"],
                    "choices": [{"index": 0, "text": "".join(PIECES), "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 3, "total_tokens": 0}}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):  # forwarding must never use it: the backend would render
            self.calls.append(("/v1/chat/completions", await request.json()))
            return JSONResponse({"error": {"message": "not here"}}, status_code=500)

        return app

    @staticmethod
    async def events(body: dict):
        for i, piece in enumerate(PIECES):
            last = i == len(PIECES) - 1
            chunk = {"id": "cmpl-rec", "object": "text_completion", "created": 1, "model": body["model"],
                     "choices": [{"index": 0, "text": piece, "finish_reason": "stop" if last else None,
                                  "logprobs": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 3, "total_tokens": 0}
            yield f"data: {json.dumps({'id': 'cmpl-rec', 'object': 'text_completion', 'created': 1, 'model': body['model'], 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"


def sse(r: httpx.Response) -> list:
    lines = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
    return [x if x == "[DONE]" else json.loads(x) for x in lines]
