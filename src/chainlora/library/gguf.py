"""`chainlora export --format gguf`: a library for llama.cpp, and Ollama up to 0.33.

    OUT/base.gguf              (a GGUF base only; a Hugging Face directory base is left to llama.cpp's
                               convert_hf_to_gguf.py, the adapters are written all the same)
                               the library's base model as it is (the default model's Q4_1 file), or
                               re-encoded (--base-dtype f32 / f16 / q8_0), every key (tokenizer, chat
                               template) copied
    OUT/adapters/<name>.gguf   every task adapter and the mixed one as a llama.cpp LoRA GGUF
    OUT/Modelfiles/<name>      an Ollama Modelfile per adapter (FROM + ADAPTER + SYSTEM + TEMPLATE)
    OUT/export.json            task -> file, rank, base sha256, the selector to route with, the prompt
    OUT/llama-server.sh        llama-server with every adapter loaded, none applied

A llama.cpp LoRA GGUF (read llama.cpp's convert_lora_to_gguf.py and llama-adapter.cpp for the
format): general.type = adapter, adapter.type = lora, adapter.lora.alpha, general.architecture
= the base's, and per adapted weight `blk.N.<llama.cpp name>.weight.lora_a` (PEFT's A, r x in)
and `.lora_b` (B, out x r). Written here with the `gguf` package alone. The traps, each handled:

- llama.cpp scales every tensor by alpha / rank, the rank read from that tensor. PEFT's
  scaling (alpha / r, alpha / sqrt(r) with rsLoRA, per-module rank_pattern / alpha_pattern, a
  COLA export of rank sum r_j) is folded into B, every tensor is zero-padded to one rank R
  (zero rows of A and columns of B add nothing), and alpha is written as R: scale 1 everywhere.
- Per architecture (gguf_arch.py: llama, gemma3, qwen2): llama.cpp's name for it, and for llama
  the q_proj / k_proj rows permuted as its converter stores them (B permuted the same way).
- What llama.cpp cannot load is refused with one line: LoRA on embeddings, lm_head or a vision
  tower, `modules_to_save`, DoRA, LoRA biases, an architecture without known rules.

The Modelfile prompts as training did: SYSTEM is the system prompt the adapters were trained
with (the chat template's own default when the library set none, e.g. SmolLM2's), and TEMPLATE
is cut from chainlora's own renderings of the training tokenizer's template (ollama_template),
so a turn renders byte for byte the prompt training built. Which Ollama releases take it: the
notes above OLLAMA_CHECKED, and docs/export.md.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from chainlora import atomic
from chainlora.data import prompts
from chainlora.errors import ChainloraError
from chainlora.library.export import (SYSTEM_MARK, USER_MARK, base_record, default_selector, library_prompt,
                                      template_default_system)
from chainlora.library.gguf_arch import MODULE, RULES, TENSOR_NAMES, config_facts, gguf_facts, permute
from chainlora.library.lora_math import peft_scale
from chainlora.library.store import ADAPTER_FILES, Library


def _refuse(where: Path, cfg: dict) -> None:
    if cfg.get("peft_type") != "LORA":
        raise ChainloraError(f"{where}: llama.cpp loads LoRA adapters only (this is {cfg.get('peft_type')})")
    if cfg.get("use_dora"):
        raise ChainloraError(f"{where}: DoRA adapters cannot be loaded by llama.cpp; retrain with use_dora false")
    if cfg.get("modules_to_save"):
        raise ChainloraError(f"{where}: modules_to_save {cfg['modules_to_save'][0]!r} (a full module copy) "
                             "cannot be loaded by llama.cpp; retrain without it")
    if cfg.get("lora_bias"):
        raise ChainloraError(f"{where}: LoRA biases (lora_bias) cannot be loaded by llama.cpp")


def lora_tensors(adapter_dir: Path, n_head: int, n_head_kv: int,
                 arch: str = "llama") -> tuple[dict[str, np.ndarray], int]:
    """({llama.cpp tensor name: float32 array}, R) for one PEFT LoRA directory on a base of
    llama.cpp architecture `arch`: PEFT's scaling folded into B, q/k B permuted where that
    architecture's converter permutes them, every tensor padded to rank R (module docstring)."""
    from safetensors.numpy import load_file

    where = adapter_dir / ADAPTER_FILES[0]
    cfg = json.loads(where.read_text())
    _refuse(where, cfg)
    weights = load_file(str(adapter_dir / ADAPTER_FILES[1]))
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        m = MODULE.fullmatch(module)
        if not m or m.group(2) not in TENSOR_NAMES:
            raise ChainloraError(f"{where}: a LoRA on {module.removeprefix('base_model.model.')!r} cannot be loaded "
                                 f"by llama.cpp (it adapts {', '.join(TENSOR_NAMES)} of the text model's layers)")
        layer, proj = int(m.group(1)), m.group(2)
        a = weights[key].astype(np.float32)
        b = weights[f"{module}.lora_B.weight"].astype(np.float32) * np.float32(peft_scale(cfg, module))
        if RULES[arch].permute_qk and proj in ("q_proj", "k_proj"):
            b = permute(b, n_head if proj == "q_proj" else n_head_kv)
        pairs[f"blk.{layer}.{TENSOR_NAMES[proj]}.weight"] = (a, b)
    extra = [k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if extra:
        raise ChainloraError(f"{where}: weights llama.cpp cannot load: {extra[0]}")
    if not pairs:
        raise ChainloraError(f"{where}: no LoRA weights")
    rank = max(a.shape[0] for a, _ in pairs.values())
    out = {}
    for name, (a, b) in pairs.items():
        pad = rank - a.shape[0]
        out[f"{name}.lora_a"] = np.ascontiguousarray(np.pad(a, ((0, pad), (0, 0))))
        out[f"{name}.lora_b"] = np.ascontiguousarray(np.pad(b, ((0, 0), (0, pad))))
    return out, rank


def write_adapter(path: Path, tensors: dict[str, np.ndarray], rank: int, arch: str = "llama",
                  dtype: str = "f32", name: str | None = None) -> None:
    """One llama.cpp LoRA GGUF (alpha = rank: scale 1, the scaling is in B)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    if name:
        writer.add_name(name)
    for key, value in tensors.items():
        writer.add_tensor(key, value.astype(np.float16 if dtype == "f16" else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


BASE_DTYPES = ("source", "f32", "f16", "q8_0")
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's general.file_type (LLAMA_FTYPE_*)


def reencode_base(src: Path, dst: Path, dtype: str) -> None:
    """A copy of the GGUF `src` with its weights dequantised and written as `dtype`: every
    metadata key copied (tokenizer, chat template); 1-D tensors (norms) stay F32, as llama.cpp's
    own converter keeps them; q8_0 where a row splits into 32-value blocks, else F16."""
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        writer.add_key_value(key, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
    writer.add_file_type(FILE_TYPES[dtype])
    Q = gguf.GGMLQuantizationType
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if w.ndim < 2 or dtype == "f32":
            writer.add_tensor(t.name, w)
        elif dtype == "q8_0" and w.shape[-1] % 32 == 0:
            writer.add_tensor(t.name, quantize(w, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(t.name, w.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_fits(tensors: dict[str, np.ndarray], shapes: dict[str, tuple], where: Path) -> None:
    """Every adapted weight exists in the base GGUF with the adapter's shape (llama.cpp refuses
    to start otherwise): one line naming the first that does not."""
    for key, a in tensors.items():
        if not key.endswith(".lora_a"):
            continue
        name, b = key[: -len(".lora_a")], tensors[key[: -len(".lora_a")] + ".lora_b"]
        want = (a.shape[1], b.shape[0])  # GGUF lists a weight's shape inner dimension first
        if shapes.get(name) is None or tuple(shapes[name][:2]) != want:
            got = "missing" if name not in shapes else f"shape {shapes[name]}"
            raise ChainloraError(f"{where}: {name} {want} does not fit the base model ({got}): "
                                 "the adapter was trained on another model")


REPLY_MARK, NEXT_MARK = "@@chainlora-reply@@", "@@chainlora-next@@"


def _cut(text: str, *marks: str) -> list[str] | None:
    """text split at each mark in turn (each exactly once, in this order), else None."""
    parts = []
    for mark in marks:
        if text.count(mark) != 1:
            return None
        head, text = text.split(mark)
        parts.append(head)
    return parts + [text]


def _template_parts(tokenizer: object) -> tuple[str, str, str, str, str] | None:
    """(A, B, U, T, E) of a turn `A System B U Prompt T Response E` (A..B only with a system),
    from chainlora's renderings: the one-turn prompt with a system, without one, and two turns."""
    one = _cut(prompts.render(tokenizer, USER_MARK, SYSTEM_MARK), SYSTEM_MARK, USER_MARK)
    if one is None:
        return None
    a, middle, t = one  # middle = B + U: where the system turn ends and the user's begins
    bare = prompts.render(tokenizer, USER_MARK)
    u = bare[: -len(USER_MARK + t)] if bare.endswith(USER_MARK + t) else None  # U P T without a system
    if not prompts.has_chat_template(tokenizer):  # plain prompts keep only the last user turn
        return (a, middle[: len(middle) - len(u)], u, t, "\n\n") if u is not None and middle.endswith(u) else None
    two = prompts.render_chat(tokenizer, [{"role": "system", "content": SYSTEM_MARK},
                                          {"role": "user", "content": USER_MARK},
                                          {"role": "assistant", "content": REPLY_MARK},
                                          {"role": "user", "content": NEXT_MARK}])
    turns = _cut(two, SYSTEM_MARK, USER_MARK, REPLY_MARK, NEXT_MARK)
    if turns is None or turns[:3] != [a, middle, t] or turns[4] != t:
        return None
    between = turns[3]  # E + U
    if template_default_system(tokenizer) is not None:  # the bare prompt has the default system
        u = _system_end_split(tokenizer, a, middle, between)
    if u is None or not (middle.endswith(u) and between.endswith(u)):
        return None  # e.g. a template that folds the system prompt into the user turn
    return a, middle[: len(middle) - len(u)], u, t, between[: len(between) - len(u)]


def _system_end_split(tokenizer: object, a: str, middle: str, between: str) -> str | None:
    """U where the template writes a default system (no bare one-turn prompt shows U alone): the
    system turn rendered alone ends with B, middle = B + U; else the longest U both turns share.
    Either is exact for every turn Ollama renders with .System set, and for every later turn."""
    try:
        alone = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_MARK}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template may refuse a conversation without a user turn
        alone = ""
    b = alone[len(a + SYSTEM_MARK):] if alone.startswith(a + SYSTEM_MARK) else None
    if b and middle.startswith(b) and between.endswith(middle[len(b):]):
        return middle[len(b):]
    n = 0
    while n < min(len(middle), len(between)) and middle[-1 - n] == between[-1 - n]:
        n += 1
    return middle[len(middle) - n:] if n else None


def ollama_template(tokenizer: object) -> str | None:
    """Ollama's TEMPLATE for the prompts training built, in the plainest Go template syntax
    (.System / .Prompt / .Response, one if): one turn renders exactly prompts.render's prompt,
    and later turns what prompts.render_chat writes between turns. None where the renderings
    do not split that way (or would need escaping): Ollama then uses the GGUF's template."""
    try:
        parts = _template_parts(tokenizer)
    except Exception:  # noqa: BLE001 - a template may refuse a system turn (Gemma 2's raises)
        parts = None
    if parts is None or any("{{" in p or '"""' in p for p in parts):
        return None
    a, b, u, t, e = parts
    return f"{{{{ if .System }}}}{a}{{{{ .System }}}}{b}{{{{ end }}}}{u}{{{{ .Prompt }}}}{t}{{{{ .Response }}}}{e}"


# What Ollama takes, read in its source (github.com/ollama/ollama; docs/export.md has the details):
# `ollama create` turns a GGUF file whose general.type is "adapter" into an adapter layer
# (server/create.go), and the runner applies it: in 0.24 (the release before 0.30) llama.cpp's C API
# for llama / qwen2, while gemma3 ran on Ollama's own engine, which refuses LoRA ("loras are not yet
# implemented");
# from 0.30 every GGUF model runs on upstream llama-server with `--lora` (llm/llama_server.go).
# 0.34.1 and later reportedly refuse ADAPTER in `ollama create` (ollama PR #14969, not read).
OLLAMA_CHECKED = {"v0.24.0": "c28ddc0a7b273cd286b680a6db0bef0c17bc0ec0",
                  "v0.33.0-rc2": "fb30760996871fa9460115c753afd2c60d4ab0f7"}
OLLAMA_FIRST = {"gemma3": "0.30"}  # first release that loads an adapter on it (else: the oldest read, 0.24)
OLLAMA_REFUSED = "0.34.1 and later refuse ADAPTER in ollama create (reported: ollama PR #14969)"


def ollama_versions(arch: str) -> str:
    """The Ollama releases whose source shows they load this export's Modelfile for `arch`."""
    return f"{OLLAMA_FIRST.get(arch, '0.24')} to 0.33"


def modelfile(name: str, system: str | None, template: str | None, stop: str | None, arch: str = "llama") -> str:
    """An Ollama Modelfile: the base, one adapter (Ollama applies one per model), the system
    prompt the adapters were trained with and the training prompt's template (module docstring),
    after comments saying which Ollama releases take it (OLLAMA_CHECKED) and what to use after."""
    lines = [f"# Ollama {ollama_versions(arch)} (as read in its source): ollama create NAME -f Modelfiles/{name}",
             f"# Ollama {OLLAMA_REFUSED}: use ../llama-server.sh instead",
             "FROM ../base.gguf", f"ADAPTER ../adapters/{name}.gguf"]
    if system:
        if '"""' in system:
            raise ChainloraError('system_prompt: contains """, which an Ollama Modelfile cannot quote')
        lines.append(f'SYSTEM """{system}"""')
    if template:
        lines.append(f'TEMPLATE """{template}"""')
        if stop:
            lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def ollama_files(lib: Library, names: list[str], arch: str = "llama") -> tuple[dict[str, str], dict[str, Any]]:
    """({adapter: its Modelfile}, the prompt facts) from the training tokenizer: SYSTEM as trained,
    TEMPLATE cut from chainlora's own renderings."""
    from chainlora.base_model import load_tokenizer

    tokenizer = load_tokenizer(lib.manifest["base_model"]["name"])
    prompt = library_prompt(lib, tokenizer)
    template = ollama_template(tokenizer)
    prompt["ollama_template"] = template is not None
    stop = prompts.end_of_answer(tokenizer)
    return {n: modelfile(n, prompt["system_prompt_as_trained"], template, stop, arch) for n in names}, prompt


def _check_request(kind: str, dtype: str, base_dtype: str) -> None:
    if kind != "gguf" and base_dtype != "source":
        raise ChainloraError(f"--base-dtype {base_dtype}: the base model is not a GGUF file, nothing to re-encode")
    if dtype not in ("f32", "f16"):
        raise ChainloraError(f"--adapter-dtype: {dtype!r} (use f32 or f16)")
    if base_dtype not in BASE_DTYPES:
        raise ChainloraError(f"--base-dtype: {base_dtype!r} (use {', '.join(BASE_DTYPES)})")


def _base_report(kind: str, base: Path, tmp: Path, base_dtype: str, arch: str) -> dict[str, Any]:
    """export.json's `base`: the base.gguf written, or what to convert where there is none."""
    from chainlora.base_model import sha256_file

    if kind != "gguf":
        return {"file": None, "arch": arch, "source": str(base),
                "note": "convert the base with llama.cpp's convert_hf_to_gguf.py to base.gguf here"}
    return {"file": "base.gguf", "source_sha256": sha256_file(base), "dtype": base_dtype,
            "sha256": sha256_file(tmp / "base.gguf"), "arch": arch}


def _write_scripts(tmp: Path, names: list[str]) -> list[str]:
    """llama-server.sh (every adapter loaded, none applied, no host-memory prompt cache where the
    binary has one: it restores prompts computed under another adapter, serve/llamacpp.py);
    returns its command."""
    command = ["llama-server", "-m", "base.gguf", "--lora", ",".join(f"adapters/{n}.gguf" for n in names),
               "--lora-init-without-apply", "--port", "8080"]
    atomic.write_text(tmp / "llama-server.sh", "#!/bin/sh\n# every adapter loaded, none applied: each request "
                      "names its adapter (chainlora serve --backend llamacpp [--backend-cache-prompt])\n"
                      "cd \"$(dirname \"$0\")\"\n"
                      "# no host-memory prompt cache (llama.cpp's --cache-ram, 8 GiB by default where it exists): it\n"
                      "# restores a prompt computed under another adapter; each slot's own cache stays\n"
                      "if llama-server --help 2>/dev/null | grep -q -e --cache-ram; then set -- --cache-ram 0 \"$@\"; fi\n"
                      "exec " + " ".join(shlex.quote(c) for c in command) + " \"$@\"\n")
    (tmp / "llama-server.sh").chmod(0o755)
    return command


def export_gguf(lib: Library, out: Path, dtype: str = "f32", base_dtype: str = "source") -> dict:
    """The library for llama.cpp / Ollama (module docstring); facts in OUT/export.json."""
    from chainlora.base_model import resolve

    kind, base = resolve(lib.manifest["base_model"]["name"])
    if kind == "hub":
        raise ChainloraError(f"{lib.root}: base model {base!r} is a hub id: export needs it as a local "
                             "directory or .gguf file (train on a local copy)")
    _check_request(kind, dtype, base_dtype)
    facts = gguf_facts(Path(base)) if kind == "gguf" else config_facts(Path(base))
    arch, entries = facts["arch"], lib.tasks + ([lib.mixed] if lib.mixed else [])
    converted = {e["name"]: lora_tensors(lib.path(e), facts["n_head"], facts["n_head_kv"], arch) for e in entries}
    for e in entries:
        if facts["shapes"] is not None:
            check_fits(converted[e["name"]][0], facts["shapes"], lib.path(e))
    modelfiles, prompt = ollama_files(lib, list(converted), arch)
    with atomic.directory(out, replace=True) as tmp:
        if kind == "gguf" and base_dtype == "source":
            shutil.copy2(base, tmp / "base.gguf")
        elif kind == "gguf":
            reencode_base(Path(base), tmp / "base.gguf", base_dtype)
        (tmp / "adapters").mkdir()
        (tmp / "Modelfiles").mkdir()
        adapters = {}
        for name, (tensors, rank) in converted.items():
            write_adapter(tmp / "adapters" / f"{name}.gguf", tensors, rank, arch, dtype, name)
            atomic.write_text(tmp / "Modelfiles" / name, modelfiles[name])
            adapters[name] = {"path": f"adapters/{name}.gguf", "rank": rank, "alpha": rank,
                              "modelfile": f"Modelfiles/{name}"}
        report = {"format": "gguf", "library": str(lib.root), "base_model": base_record(lib, str(base)),
                  "base": _base_report(kind, Path(base), tmp, base_dtype, arch),
                  "adapters": adapters, "tasks": [e["name"] for e in lib.tasks],
                  "mixed": lib.mixed["name"] if lib.mixed else None, "selector": default_selector(lib),
                  "prompt": prompt, "adapter_dtype": dtype, "llama_server": _write_scripts(tmp, list(adapters)),
                  "ollama": {"versions": ollama_versions(arch), "checked_in_source": OLLAMA_CHECKED,
                             "not_supported": OLLAMA_REFUSED}}
        atomic.write_json(tmp / "export.json", report)
    return report
