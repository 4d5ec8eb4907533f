"""`serve --backend llamacpp` against a fake llama-server: every request lists EVERY loaded
adapter with an explicit scale (1 for the routed one, else 0), ids taken from GET
/lora-adapters; the prompt is the local engine's token ids; a server without the library's
adapters is one clear error, not a wrong answer."""

from __future__ import annotations

import httpx
import pytest
from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here

from conftest import PIECES, Recording, sse

from chainlora.inference.engine import Engine
from chainlora.serve import Server, create_app
from chainlora.serve.llamacpp import LlamaCppForwarder


class FakeLlamaServer(Recording):
    """Recording's /v1/completions plus llama-server's GET /lora-adapters (ids in file order)."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = names

    def app(self):
        app = super().app()

        @app.get("/lora-adapters")
        async def adapters(request: Request):
            self.calls.append(("/lora-adapters", {}))
            return [{"id": i, "path": f"adapters/{n}.gguf", "scale": 0.0} for i, n in enumerate(self.names)]

        return app


@pytest.fixture(scope="module")
def front(random_lib):
    from conftest import LiveApp

    engine = Engine.load(random_lib, device="cpu")
    names = engine.lib.task_names + ["mixed"]
    fake = FakeLlamaServer(list(reversed(names)))  # ids unlike the library's order
    backend = LiveApp(fake.app())
    server = Server(engine, forwarder=LlamaCppForwarder(backend.url, names))
    app = LiveApp(create_app(server))
    yield app, fake, names
    app.close()
    backend.close()
    server.scheduler.close()


@pytest.mark.parametrize("stream", [False, True])
def test_every_adapter_has_an_explicit_scale_and_only_the_chosen_one_is_on(front, stream):
    app, fake, names = front
    task = names[0]
    r = httpx.post(f"{app.url}/v1/chat/completions", timeout=120, json={
        "model": task, "messages": [{"role": "user", "content": "Give the opposite of hot."}],
        "max_tokens": 4, "temperature": 0, "stream": stream})
    assert r.status_code == 200, r.text
    where, sent = fake.calls[-1]
    assert where == "/v1/completions" and all(isinstance(t, int) for t in sent["prompt"])
    assert sent["cache_prompt"] is False  # a prefix cached under another adapter would be reused
    ids = {n: i for i, n in enumerate(reversed(names))}
    assert sorted(sent["lora"], key=lambda x: x["id"]) == [
        {"id": ids[n], "scale": 1.0 if n == task else 0.0} for n in sorted(names, key=ids.get)]
    body = sse(r)[-2] if stream else r.json()
    assert body["chainlora"]["adapter"] == task
    if not stream:
        assert body["choices"][0]["message"]["content"] == "".join(PIECES)
    assert sum(1 for w, _ in fake.calls if w == "/lora-adapters") == 1  # listed once, then remembered


def test_a_server_without_the_librarys_adapters_is_one_clear_error(random_lib):
    import asyncio

    async def run() -> tuple:
        from conftest import LiveApp

        backend = LiveApp(FakeLlamaServer(["something_else"]).app())
        fwd = LlamaCppForwarder(backend.url, ["antonym"])
        try:
            return await fwd.complete({"model": "antonym", "prompt": [1, 2], "max_tokens": 1})
        finally:
            await fwd.close()
            backend.close()

    status, body = asyncio.run(run())
    assert status == 502 and "no adapter 'antonym' loaded" in body["error"]["message"]


def test_cache_prompt_only_when_asked_and_only_for_llamacpp(random_lib, cli):
    """--backend-cache-prompt sends cache_prompt true (the export's llama-server.sh turns the
    host-memory prompt cache off, which is what makes it safe); other backends refuse the flag."""
    import asyncio

    from chainlora.serve.settings import ServeSettings

    forwarder = LlamaCppForwarder("http://127.0.0.1:9/v1", ["antonym"], cache_prompt=True)
    forwarder.ids = {"antonym": 0}
    sent = asyncio.run(forwarder.with_lora({"model": "antonym", "prompt": [1, 2]}))
    assert sent["cache_prompt"] is True and sent["lora"] == [{"id": 0, "scale": 1.0}]
    with pytest.raises(Exception, match="--backend-cache-prompt: only for --backend llamacpp"):
        ServeSettings(backend="openai", backend_url="http://x/v1", backend_cache_prompt=True)
    r = cli("serve", str(random_lib), "--backend-cache-prompt")
    assert r.returncode == 2 and r.stderr.strip() == "chainlora: error: --backend-cache-prompt: only for --backend llamacpp"


def test_the_exported_llama_server_script_turns_the_ram_prompt_cache_off(tmp_path):
    import subprocess

    from chainlora.library.gguf import _write_scripts

    _write_scripts(tmp_path, ["antonym"])
    fake = tmp_path / "bin" / "llama-server"  # prints its arguments; --help lists --cache-ram
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nif [ "$1" = --help ]; then echo "-cram, --cache-ram N"; exit 0; fi\necho "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin"}
    out = subprocess.run([str(tmp_path / "llama-server.sh"), "--parallel", "4"], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["-m", "base.gguf", "--lora", "adapters/antonym.gguf", "--lora-init-without-apply",
                                  "--port", "8080", "--cache-ram", "0", "--parallel", "4"]
    fake.write_text('#!/bin/sh\n[ "$1" = --help ] && exit 0\necho "$@"\n')  # an older llama-server: no such flag
    out = subprocess.run([str(tmp_path / "llama-server.sh")], capture_output=True, text=True, env=env)
    assert "--cache-ram" not in out.stdout.split()
