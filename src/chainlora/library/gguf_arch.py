"""llama.cpp's per-architecture conversion rules, as far as a LoRA adapter GGUF depends on them.

llama.cpp converts a Hugging Face model with one class per architecture (convert_hf_to_gguf.py,
conversion/*.py) and a PEFT LoRA by running that same class over A and B
(convert_lora_to_gguf.py). Three of its decisions bind the adapter GGUF written here:

- `general.architecture`: llama.cpp's name for the model. llama.cpp refuses an adapter whose
  name differs from the base model's ("model arch and LoRA arch mismatch", llama-adapter.cpp).
- tensor names: q/k/v/o_proj and gate/up/down_proj of layer N become blk.N.attn_q / attn_k /
  attn_v / attn_output / ffn_gate / ffn_up / ffn_down for every architecture here.
- row order: LlamaModel (llama, and Mistral, which llama.cpp converts as llama) permutes the rows
  of q_proj / k_proj (each head's rotary halves side by side), so B of those gets the same
  permutation; Gemma3Model and Qwen2Model write every weight in transformers' order.

Their other per-tensor changes touch tensors a LoRA here never adapts: Gemma's `norm.weight + 1`
(transformers' Gemma3RMSNorm multiplies by 1 + w), Gemma 3's embedding rows cut to the
vocabulary, Qwen2's q/k/v biases. So no offset or scale applies to A or B beyond PEFT's own.
Read in llama.cpp as vendored by llama-cpp-python 0.3.36 (conversion/llama.py, gemma.py, qwen.py).
The architecture comes from the base model itself: a GGUF's `general.architecture`, or a model
directory's config.json (`architectures`, as llama.cpp picks its converter, else `model_type`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chainlora.errors import ChainloraError


@dataclass(frozen=True)
class ArchRule:
    """One llama.cpp architecture: its GGUF name, whether q/k rows are permuted, and the Hugging
    Face classes (config.json `architectures`) and model types llama.cpp converts to it."""

    name: str
    permute_qk: bool
    hf_classes: tuple[str, ...]
    model_types: tuple[str, ...]


RULES: dict[str, ArchRule] = {r.name: r for r in (
    ArchRule("llama", True, ("LlamaForCausalLM", "MistralForCausalLM"), ("llama", "mistral")),
    ArchRule("gemma3", False, ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), ("gemma3_text", "gemma3")),
    ArchRule("qwen2", False, ("Qwen2ForCausalLM",), ("qwen2",)),
)}
TENSOR_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
# a text decoder layer's projection, as PEFT names it: causal LMs (model.layers.N) and Gemma 3's
# multimodal wrapper (model.language_model.layers.N); its vision tower's layers do not match
MODULE = re.compile(r"(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?(?:model\.)?"
                    r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order of a llama q/k projection (or of its LoRA B): within each head, the
    rotary pairs' halves side by side."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unknown(where: object, what: str) -> ChainloraError:
    return ChainloraError(f"{where}: architecture {what}: the GGUF export knows llama.cpp's conversion rules for "
                          f"{', '.join(RULES)} only")


def rule_for_gguf(arch: str | None, where: object) -> ArchRule:
    """The rule for a GGUF base's `general.architecture`."""
    if arch not in RULES:
        raise _unknown(where, repr(arch))
    return RULES[arch]


def rule_for_config(cfg: dict[str, Any], where: object) -> ArchRule:
    """The rule for a config.json: the class llama.cpp would convert it with (text_config's
    `architectures` first, then the top level's first), else its `model_type`."""
    text = cfg.get("text_config") or {}
    classes = text.get("architectures") or cfg.get("architectures") or []
    if classes:
        found = [r for r in RULES.values() if classes[0] in r.hf_classes]
        what = f"{classes[0]!r} (model_type {cfg.get('model_type')!r})"
    else:
        found = [r for r in RULES.values() if cfg.get("model_type") in r.model_types]
        what = f"model_type {cfg.get('model_type')!r}"
    if not found:
        raise _unknown(where, what)
    return found[0]


def gguf_facts(gguf_path: Path) -> dict[str, Any]:
    """What the export needs from a base GGUF's metadata (no tensor data is read)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    rule = rule_for_gguf(field("general.architecture"), gguf_path)
    heads = field(f"{rule.name}.attention.head_count")
    return {"arch": rule.name, "shapes": {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors},
            "n_head": heads, "n_head_kv": field(f"{rule.name}.attention.head_count_kv") or heads}


def config_facts(model_dir: Path) -> dict[str, Any]:
    """The same facts from a Hugging Face model directory's config.json (the text model's part of
    a multimodal one); no tensor shapes: base.gguf comes from llama.cpp's convert_hf_to_gguf.py."""
    where = model_dir / "config.json"
    try:
        cfg = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise ChainloraError(f"{where}: cannot read the base model's config ({e})") from None
    rule = rule_for_config(cfg, where)
    hp = {**cfg, **(cfg.get("text_config") or {})}  # as llama.cpp reads a multimodal model's text part
    heads = hp.get("num_attention_heads")
    return {"arch": rule.name, "shapes": None, "n_head": heads, "n_head_kv": hp.get("num_key_value_heads") or heads}
