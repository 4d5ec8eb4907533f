"""Shared test fixtures.

Tests run offline on CPU. Fast unit tests use a tiny Llama built from a config with a small
byte-level BPE tokenizer trained here; tests marked `e2e` use the real default model, converted
ONCE per run into a session cache directory (set CHAINLORA_TEST_HOME to reuse one across runs).
"""

from __future__ import annotations

import json
import os
import sys
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


def make_tiny_model(directory: Path, *, chat_template: bool = True, pad_token: bool = False) -> Path:
    """Save a tiny random Llama plus a trained byte-level BPE tokenizer to `directory`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TOKENIZER_TEXT, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>" if pad_token else None)
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


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
