"""`chainlora export --format gguf`: a library for llama.cpp and Ollama.

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
format): general.type = adapter, adapter.type = lora, adapter.lora.alpha, and per adapted
weight `blk.N.<llama.cpp name>.weight.lora_a` (PEFT's A, r x in) and `.lora_b` (B, out x r).
Written here with the `gguf` package alone. Three traps, each handled:

- llama.cpp scales every tensor by alpha / rank, the rank read from that tensor. PEFT's
  scaling (alpha / r, alpha / sqrt(r) with rsLoRA, per-module rank_pattern / alpha_pattern, a
  COLA export of rank sum r_j) is folded into B, every tensor is zero-padded to one rank R
  (zero rows of A and columns of B add nothing), and alpha is written as R: scale 1 everywhere.
- llama.cpp stores q_proj / k_proj rows permuted (its converter reorders each head's rotary
  halves; transformers undoes it when it loads a GGUF), so B of q_proj / k_proj gets the same
  permutation (q by the attention heads, k by the key-value heads).
- What llama.cpp cannot load is refused with one line: LoRA on embeddings or lm_head,
  `modules_to_save`, DoRA, LoRA biases, and any architecture but llama (the permutation is
  llama's).

The Modelfile prompts as training did: SYSTEM is the system prompt the adapters were trained
with (the chat template's own default when the library set none, e.g. SmolLM2's), and TEMPLATE
is cut from chainlora's own renderings of the training tokenizer's template (ollama_template),
so a turn renders byte for byte the prompt training built.
"""

from __future__ import annotations

import json
import re
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
from chainlora.library.lora_math import peft_scale
from chainlora.library.store import ADAPTER_FILES, Library

LLAMA_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
MODULE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order of a q/k projection (or of its LoRA B): within each head, the
    rotary pairs' halves side by side."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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


def lora_tensors(adapter_dir: Path, n_head: int, n_head_kv: int) -> tuple[dict[str, np.ndarray], int]:
    """({llama.cpp tensor name: float32 array}, R) for one PEFT LoRA directory: PEFT's scaling
    folded into B, q/k B permuted, every tensor padded to rank R (module docstring)."""
    from safetensors.numpy import load_file

    where = adapter_dir / ADAPTER_FILES[0]
    cfg = json.loads(where.read_text())
    _refuse(where, cfg)
    weights = load_file(str(adapter_dir / ADAPTER_FILES[1]))
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        m = MODULE.fullmatch(module)
        if not m or m.group(2) not in LLAMA_NAMES:
            raise ChainloraError(f"{where}: a LoRA on {module.split('.')[-1]!r} cannot be loaded by llama.cpp "
                                 f"(it adapts {', '.join(LLAMA_NAMES)} of the transformer layers)")
        layer, proj = int(m.group(1)), m.group(2)
        a = weights[key].astype(np.float32)
        b = weights[f"{module}.lora_B.weight"].astype(np.float32) * np.float32(peft_scale(cfg, module))
        if proj in ("q_proj", "k_proj"):
            b = permute(b, n_head if proj == "q_proj" else n_head_kv)
        pairs[f"blk.{layer}.{LLAMA_NAMES[proj]}.weight"] = (a, b)
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


def base_facts(gguf_path: Path) -> dict[str, Any]:
    """What the export needs from the base GGUF's metadata (no tensors are read)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    arch = field("general.architecture")
    return {"arch": arch, "shapes": {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors},
            "n_head": field(f"{arch}.attention.head_count"),
            "n_head_kv": field(f"{arch}.attention.head_count_kv") or field(f"{arch}.attention.head_count")}


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


def dir_facts(model_dir: Path) -> dict[str, Any]:
    """The same facts from a Hugging Face model directory's config.json (no base.gguf can be
    written from it here: llama.cpp's convert_hf_to_gguf.py does that)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = "llama" if cfg.get("model_type") == "llama" else cfg.get("model_type")
    heads = cfg.get("num_attention_heads")
    return {"arch": arch, "shapes": None, "n_head": heads, "n_head_kv": cfg.get("num_key_value_heads") or heads}


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


def modelfile(name: str, system: str | None, template: str | None, stop: str | None) -> str:
    """An Ollama Modelfile: the base, one adapter (Ollama applies one per model), the system
    prompt the adapters were trained with and the training prompt's template (module docstring)."""
    lines = ["FROM ../base.gguf", f"ADAPTER ../adapters/{name}.gguf"]
    if system:
        if '"""' in system:
            raise ChainloraError('system_prompt: contains """, which an Ollama Modelfile cannot quote')
        lines.append(f'SYSTEM """{system}"""')
    if template:
        lines.append(f'TEMPLATE """{template}"""')
        if stop:
            lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def ollama_files(lib: Library, names: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """({adapter: its Modelfile}, the prompt facts) from the training tokenizer: SYSTEM as trained,
    TEMPLATE cut from chainlora's own renderings."""
    from chainlora.base_model import load_tokenizer

    tokenizer = load_tokenizer(lib.manifest["base_model"]["name"])
    prompt = library_prompt(lib, tokenizer)
    template = ollama_template(tokenizer)
    prompt["ollama_template"] = template is not None
    stop = prompts.end_of_answer(tokenizer)
    return {n: modelfile(n, prompt["system_prompt_as_trained"], template, stop) for n in names}, prompt


def _check_request(kind: str, base: Path | str, facts: dict, dtype: str, base_dtype: str) -> None:
    if kind != "gguf" and base_dtype != "source":
        raise ChainloraError(f"--base-dtype {base_dtype}: the base model is not a GGUF file, nothing to re-encode")
    if facts["arch"] != "llama":
        raise ChainloraError(f"{base}: architecture {facts['arch']!r}: the GGUF export knows llama's layout only")
    if dtype not in ("f32", "f16"):
        raise ChainloraError(f"--adapter-dtype: {dtype!r} (use f32 or f16)")
    if base_dtype not in BASE_DTYPES:
        raise ChainloraError(f"--base-dtype: {base_dtype!r} (use {', '.join(BASE_DTYPES)})")


def export_gguf(lib: Library, out: Path, dtype: str = "f32", base_dtype: str = "source") -> dict:
    """The library for llama.cpp / Ollama (module docstring); facts in OUT/export.json."""
    from chainlora.base_model import resolve, sha256_file

    kind, base = resolve(lib.manifest["base_model"]["name"])
    if kind == "hub":
        raise ChainloraError(f"{lib.root}: base model {base!r} is a hub id: export needs it as a local "
                             "directory or .gguf file (train on a local copy)")
    facts = base_facts(Path(base)) if kind == "gguf" else dir_facts(Path(base))
    _check_request(kind, base, facts, dtype, base_dtype)
    entries = lib.tasks + ([lib.mixed] if lib.mixed else [])
    converted = {e["name"]: lora_tensors(lib.path(e), facts["n_head"], facts["n_head_kv"]) for e in entries}
    for e in entries:
        if facts["shapes"] is not None:
            check_fits(converted[e["name"]][0], facts["shapes"], lib.path(e))
    modelfiles, prompt = ollama_files(lib, list(converted))
    with atomic.directory(out, replace=True) as tmp:
        if kind != "gguf":
            pass  # adapters only: base.gguf comes from llama.cpp's converter (the report says so)
        elif base_dtype == "source":
            shutil.copy2(base, tmp / "base.gguf")
        else:
            reencode_base(Path(base), tmp / "base.gguf", base_dtype)
        (tmp / "adapters").mkdir()
        (tmp / "Modelfiles").mkdir()
        adapters = {}
        for name, (tensors, rank) in converted.items():
            write_adapter(tmp / "adapters" / f"{name}.gguf", tensors, rank, facts["arch"], dtype, name)
            atomic.write_text(tmp / "Modelfiles" / name, modelfiles[name])
            adapters[name] = {"path": f"adapters/{name}.gguf", "rank": rank, "alpha": rank,
                              "modelfile": f"Modelfiles/{name}"}
        files = [f"adapters/{n}.gguf" for n in adapters]
        command = ["llama-server", "-m", "base.gguf", "--lora", ",".join(files),
                   "--lora-init-without-apply", "--port", "8080"]
        report = {"format": "gguf", "library": str(lib.root), "base_model": base_record(lib, str(base)),
                  "base": ({"file": "base.gguf", "source_sha256": sha256_file(Path(base)), "dtype": base_dtype,
                            "sha256": sha256_file(tmp / "base.gguf"), "arch": facts["arch"]} if kind == "gguf" else
                           {"file": None, "arch": facts["arch"], "source": str(base),
                            "note": "convert the base with llama.cpp's convert_hf_to_gguf.py to base.gguf here"}),
                  "adapters": adapters, "tasks": [e["name"] for e in lib.tasks],
                  "mixed": lib.mixed["name"] if lib.mixed else None, "selector": default_selector(lib),
                  "prompt": prompt, "adapter_dtype": dtype, "llama_server": command}
        atomic.write_json(tmp / "export.json", report)
        atomic.write_text(tmp / "llama-server.sh", "#!/bin/sh\n# every adapter loaded, none applied: each request "
                          "names its adapter (chainlora serve --backend llamacpp)\ncd \"$(dirname \"$0\")\"\nexec "
                          + " ".join(shlex.quote(c) for c in command) + " \"$@\"\n")
        (tmp / "llama-server.sh").chmod(0o755)
    return report
