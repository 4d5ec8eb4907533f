"""`chainlora export`: a library's adapters in the forms other tools load.

    peft     plain PEFT adapter directories (optionally SVD-compressed to a lower rank)
    merged   a full model with one adapter merged in: no adapter, no PEFT, at inference
    vllm     the task + mixed adapters and the `vllm serve ... --enable-lora` command for them
    gguf     the base GGUF and every adapter as a llama.cpp LoRA GGUF, Ollama Modelfiles (gguf.py)

Compression works on any LoRA adapter (a COLA chain exports at rank Σ r_j, which this brings
back down): ΔW = s·B A per module is truncated to its best rank-r approximation and the
relative Frobenius error is reported per module and in total (export.json beside the adapter).
Everything is written to a temporary directory and renamed into place.

An export reproduces the library: every exported adapter_config.json names the base by its
portable name (an alias's hub id, not this machine's cache path, which export.json keeps as
`local_path`); export.json records the prompt the adapters were trained on (the system prompt
as trained, the chat template's default one when the library set none, the template's sha256)
and, for a whole-library PEFT export, every selector with the default one, the selectors that
are not LoRAs copied to OUT/selectors/<kind>/.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

from chainlora import atomic
from chainlora.data import prompts
from chainlora.errors import ChainloraError
from chainlora.library import kinds
from chainlora.library.store import ADAPTER_FILES, NOVELTY_FILES, Library, files_of

FORMATS = ("peft", "merged", "vllm", "gguf")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
VLLM_NO_SAVE = ("lm_head", "embed_tokens", "wte", "embed_out", "word_embeddings")
SYSTEM_MARK, USER_MARK = "@@chainlora-system@@", "@@chainlora-user@@"  # what no template writes itself


def template_default_system(tokenizer: object) -> str | None:
    """The system message the chat template writes when it is given none (SmolLM2's names the
    model), found by rendering with and without one; None when it writes none."""
    if not prompts.has_chat_template(tokenizer):
        return None
    try:
        head, _, tail = prompts.render(tokenizer, USER_MARK, SYSTEM_MARK).partition(SYSTEM_MARK)
    except Exception:  # noqa: BLE001 - a template may refuse a system turn (Gemma 2's raises): no default
        return None
    bare = prompts.render(tokenizer, USER_MARK)
    if len(bare) >= len(head) + len(tail) and bare.startswith(head) and bare.endswith(tail):
        return bare[len(head):len(bare) - len(tail)]
    return None


def prompt_facts(tokenizer: object, system_prompt: str | None) -> dict[str, Any]:
    """How training built its prompts (chainlora.data.prompts.render): the library's system prompt,
    the one the prompts carried (the template's default when the library set none), the format."""
    template = getattr(tokenizer, "chat_template", None)
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    trained = system_prompt if system_prompt is not None else template_default_system(tokenizer)
    return {"format": "chat_template" if prompts.has_chat_template(tokenizer) else "plain",
            "system_prompt": system_prompt, "system_prompt_as_trained": trained,
            "chat_template_sha256": hashlib.sha256(text.encode()).hexdigest() if template else None}


def library_prompt(lib: Library, tokenizer: object | None = None) -> dict[str, Any]:
    """prompt_facts for the library (its base's tokenizer loaded when none is given); a base whose
    tokenizer cannot be loaded here (a hub id offline) is said so rather than failing the export."""
    from chainlora.base_model import load_tokenizer

    system = lib.manifest.get("system_prompt")
    try:
        return prompt_facts(tokenizer or load_tokenizer(lib.manifest["base_model"]["name"]), system)
    except ChainloraError as e:
        return {"system_prompt": system, "unknown": str(e)}


def base_record(lib: Library, local_path: str | None) -> dict[str, Any]:
    """The manifest's base model plus its portable name and the local path it was loaded from."""
    from chainlora.base_model import portable_name

    base = lib.manifest["base_model"]
    return {**base, "portable_name": portable_name(base["name"]), "local_path": local_path}


def make_portable(adapter_dir: Path, portable: str) -> str | None:
    """Point an exported copy's adapter_config.json at the portable base name (never the
    library's own file); the local path it named before."""
    path = adapter_dir / ADAPTER_FILES[0]
    cfg = json.loads(path.read_text())
    local = cfg.get("base_model_name_or_path")
    atomic.write_json(path, {**cfg, "base_model_name_or_path": portable})
    return local


def default_selector(lib: Library) -> str | None:
    """The selector a library routes with (chainlora.library.kinds.default_for), None when it has none."""
    return kinds.default_for(lib.manifest)


def export_selectors(lib: Library, tmp: Path) -> dict[str, Any]:
    """Every selector of the library (threshold as calibrated, the default named): the router's
    two read the exported router LoRA; the others, and the out-of-library detector, are copied
    to selectors/<kind>/."""
    selection = lib.selection or {}
    measured = selection.get("selectors") or {}
    found: dict[str, Any] = {}
    for s in kinds.SELECTORS.values():  # those on a LoRA (score, generate) read the exported adapter
        entry = lib.manifest.get(s.entry)
        if entry and kinds.ENTRIES[s.entry].lora:
            facts = {k: v for k, v in entry.items() if k not in ("path", "sha256", "name", "selector")}
            found[s.name] = {**facts, "adapter": entry["name"], "path": entry["name"]}
    novelty = selection.get("novelty")
    copies = lib.selector_entries() + ([("novelty", novelty)] if isinstance(novelty, dict) else [])
    for kind, entry in copies:
        files = NOVELTY_FILES if kind == "novelty" else files_of(kind)
        (tmp / "selectors" / kind).mkdir(parents=True)
        for f in files:
            shutil.copy2(lib.path(entry) / f, tmp / "selectors" / kind / f)
        found[kind] = {**entry, "path": f"selectors/{kind}", "files": list(files)}
    for kind, info in found.items():
        if "threshold" in (measured.get(kind) or {}):
            info["threshold"] = measured[kind]["threshold"]
    return {"default": default_selector(lib), "chosen_by": selection.get("chosen_by"), "kinds": found}


def _adapters(lib: Library, name: str | None) -> list[dict]:
    """The entries to export: one by name, else all (tasks, router, mixed)."""
    if name is None:
        return lib.entries()
    for entry in lib.entries():
        if entry["name"] == name:
            return [entry]
    names = ", ".join(e["name"] for e in lib.entries())
    raise ChainloraError(f"--adapter: no adapter {name!r} in {lib.root} (adapters: {names})")


def compress_adapter(src: Path, dst: Path, rank: int) -> dict:
    """Write src's LoRA truncated to `rank` (scaling folded into B, lora_alpha = r) to dst."""
    from safetensors.torch import load_file, save_file

    from chainlora.library.lora_math import peft_scale, truncate

    cfg = json.loads((src / ADAPTER_FILES[0]).read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise ChainloraError(f"{src}: only plain LoRA adapters can be compressed")
    tensors = load_file(str(src / ADAPTER_FILES[1]))
    out: dict[str, Any] = {}
    errors, dropped, norm, total_rank = {}, 0.0, 0.0, 0
    for key in sorted(k for k in tensors if k.endswith("lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        a, b = tensors[key].float(), tensors[f"{module}.lora_B.weight"].float()
        r = a.shape[0]
        s = peft_scale(cfg, module)
        if rank > r:
            raise ChainloraError(f"--compress-rank: {rank} is above {src.name}'s rank {r} ({module})")
        new_b, new_a, tail, full = truncate(s * b, a, rank)
        out[f"{module}.lora_A.weight"] = new_a.to(tensors[key].dtype).contiguous()
        out[f"{module}.lora_B.weight"] = new_b.to(tensors[key].dtype).contiguous()
        errors[module] = round(math.sqrt(tail / full), 6) if full > 0 else 0.0
        dropped, norm, total_rank = dropped + tail, norm + full, max(total_rank, r)
    rest = {k: v for k, v in tensors.items() if not k.endswith((".lora_A.weight", ".lora_B.weight"))}
    if rest:
        raise ChainloraError(f"{src}: has non-LoRA weights ({next(iter(rest))}); cannot compress")
    cfg.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / ADAPTER_FILES[1]), metadata={"format": "pt"})
    (dst / ADAPTER_FILES[0]).write_text(json.dumps(cfg, indent=2) + "\n")
    return {"rank": rank, "from_rank": total_rank,
            "relative_error": round(math.sqrt(dropped / norm), 6) if norm > 0 else 0.0,
            "module_errors": errors}


def export_peft(lib: Library, out: Path, adapter: str | None = None, compress_rank: int | None = None) -> dict:
    """Every (or one) adapter as OUT/<name>/ in plain PEFT format, with the selectors when the
    whole library is exported; facts in OUT/export.json (module docstring)."""
    from chainlora.base_model import portable_name

    portable, local = portable_name(lib.manifest["base_model"]["name"]), None
    report: dict[str, Any] = {"format": "peft", "library": str(lib.root), "base_model": None, "adapters": {}}
    with atomic.directory(out, replace=True) as tmp:
        for entry in _adapters(lib, adapter):
            src, dst = lib.path(entry), tmp / entry["name"]
            if compress_rank is None:
                dst.mkdir()
                for f in ADAPTER_FILES:
                    shutil.copy2(src / f, dst / f)
                report["adapters"][entry["name"]] = {"path": entry["name"]}
            else:
                report["adapters"][entry["name"]] = {"path": entry["name"],
                                                     "compress": compress_adapter(src, dst, compress_rank)}
            recorded = make_portable(dst, portable)
            local = local or recorded
        report["base_model"] = base_record(lib, local)
        report["prompt"] = library_prompt(lib)
        if adapter is None:
            report["selectors"] = export_selectors(lib, tmp)
        atomic.write_json(tmp / "export.json", report)
    return report


def export_merged(lib: Library, out: Path, adapter: str | None = None) -> dict:
    """The base model with one adapter merged into its weights, saved as a plain HF model."""
    from peft import PeftModel

    from chainlora.base_model import load_base

    if adapter is None:
        if len(lib.entries()) != 1:
            names = ", ".join(e["name"] for e in lib.entries())
            raise ChainloraError(f"--adapter: name the adapter to merge (adapters: {names})")
        adapter = lib.entries()[0]["name"]
    (entry,) = _adapters(lib, adapter)
    base = load_base(lib.manifest["base_model"]["name"], device="cpu")
    lib.check_base(base.name, base.fingerprint)
    merged = PeftModel.from_pretrained(base.model, str(lib.path(entry))).merge_and_unload()
    with atomic.directory(out, replace=True) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        base.tokenizer.save_pretrained(str(tmp))
        report = {"format": "merged", "library": str(lib.root), "adapter": adapter,
                  "base_model": base_record(lib, base.path), "adapter_sha256": entry.get("sha256"),
                  "prompt": library_prompt(lib, base.tokenizer)}
        atomic.write_json(tmp / "export.json", report)
    return report


def export_vllm(lib: Library, out: Path, max_loras: int | None = None) -> dict:
    """The adapters vLLM serves for a routed chain (tasks + mixed; the selector stays with
    `chainlora serve --backend openai`), checked against vLLM's LoRA limits, plus the command."""
    import shlex

    from chainlora.base_model import converted_dir, portable_name, resolve

    entries = lib.tasks + ([lib.mixed] if lib.mixed else [])
    ranks = {}
    for entry in entries:
        cfg = json.loads((lib.path(entry) / ADAPTER_FILES[0]).read_text())
        where = lib.path(entry) / ADAPTER_FILES[0]
        if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
            raise ChainloraError(f"{where}: vLLM serves plain LoRA adapters only")
        saved = [m for m in cfg.get("modules_to_save") or [] if any(k in m for k in VLLM_NO_SAVE)]
        if saved:
            raise ChainloraError(f"{where}: modules_to_save {saved[0]!r} (a full embedding / lm_head copy) "
                                 "is not servable by vLLM; retrain without it")
        ranks[entry["name"]] = max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()])
    top = max(ranks.values())
    allowed = [r for r in VLLM_RANKS if r >= top]
    if not allowed:
        name = max(ranks, key=ranks.get)
        raise ChainloraError(f"{lib.path(lib.task(name) if name != 'mixed' else lib.mixed)}: rank {top} is above "
                             f"vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}; compress it "
                             "(chainlora export --format peft --compress-rank R)")
    kind, where = resolve(lib.manifest["base_model"]["name"])
    base = str(converted_dir(where)) if kind == "gguf" else str(where)
    k = max_loras or min(len(entries), 8)
    portable = portable_name(lib.manifest["base_model"]["name"])
    with atomic.directory(out, replace=True) as tmp:
        for entry in entries:
            (tmp / "adapters" / entry["name"]).mkdir(parents=True)
            for f in ADAPTER_FILES:
                shutil.copy2(lib.path(entry) / f, tmp / "adapters" / entry["name"] / f)
            make_portable(tmp / "adapters" / entry["name"], portable)
        modules = {e["name"]: str(out.resolve() / "adapters" / e["name"]) for e in entries}
        command = (["vllm", "serve", base, "--enable-lora", "--lora-modules"]
                   + [f"{n}={p}" for n, p in modules.items()]
                   + ["--max-loras", str(k), "--max-lora-rank", str(allowed[0])])
        report = {"format": "vllm", "library": str(lib.root), "base_model": base_record(lib, base),
                  "prompt": library_prompt(lib), "base_path": base, "lora_modules": modules, "ranks": ranks,
                  "max_loras": k, "max_lora_rank": allowed[0], "command": command,
                  "front": (f"chainlora serve {shlex.quote(str(lib.root))} --backend openai --backend-url "
                            f"http://HOST:8000/v1 --backend-base-model {shlex.quote(base)}")}
        atomic.write_json(tmp / "export.json", report)
        atomic.write_text(tmp / "serve.sh", "#!/bin/sh\n# vLLM with every task adapter of the library\nexec "
                          + " ".join(shlex.quote(c) for c in command) + "\n")
        (tmp / "serve.sh").chmod(0o755)
    return report


def export(library: str | Path, out: str | Path, fmt: str, adapter: str | None = None,
           compress_rank: int | None = None, max_loras: int | None = None, adapter_dtype: str = "f32",
           base_dtype: str = "source") -> dict:
    if fmt not in FORMATS:
        raise ChainloraError(f"--format: unknown {fmt!r} (use {', '.join(FORMATS)})")
    if compress_rank is not None and (fmt != "peft" or compress_rank < 1):
        raise ChainloraError("--compress-rank: a rank >= 1, with --format peft")
    lib = Library.open(library)
    out = Path(out)
    if out.resolve() == lib.root.resolve() or out.resolve().is_relative_to(lib.root.resolve()):
        raise ChainloraError(f"--out {out}: must be outside the library")
    atomic.check_creatable(out)  # a file on the way, or a parent nobody may write in: before any work
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "export.json").is_file())):
        raise ChainloraError(f"--out {out}: exists and is not an earlier export; choose another directory")
    if fmt == "vllm":
        return export_vllm(lib, out, max_loras)
    if fmt == "gguf":
        from chainlora.library.gguf import export_gguf

        return export_gguf(lib, out, adapter_dtype, base_dtype)
    return export_peft(lib, out, adapter, compress_rank) if fmt == "peft" else export_merged(lib, out, adapter)
