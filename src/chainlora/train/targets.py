"""Which layers a LoRA adapts: `lora.target_modules`, checked against the model's own layers.

Names are PEFT's (a module name's last part, `q_proj`; a longer suffix; or `all-linear`, every
Linear but the output head). The default, q_proj and v_proj, fits llama, Gemma, Qwen and
Mistral; GPT-2 calls its attention `c_attn`, Phi-3 `qkv_proj`, Falcon `query_key_value`. A name
the model does not have is refused with the names it does have, not PEFT's bare "not found".
"""

from __future__ import annotations

ALL_LINEAR = "all-linear"


def peft_targets(names: list[str]) -> list[str] | str:
    """What LoraConfig takes: PEFT wants `all-linear` as a string, not inside a list."""
    return ALL_LINEAR if list(names) == [ALL_LINEAR] else list(names)


def linear_names(model: object) -> list[str]:
    """The last name part of every Linear-like layer of `model` (quantised and GPT-2's Conv1D
    included), the output head left out, sorted."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = set()
    for name, module in model.named_modules():
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")
        if linear and module is not head and name:
            found.add(name.rsplit(".", 1)[-1])
    return sorted(found)


def missing(model: object, names: list[str]) -> list[str]:
    """The plain names in `names` that no layer of `model` has (suffixes and regexes are PEFT's to judge)."""
    if list(names) == [ALL_LINEAR]:
        return []
    have = set(linear_names(model))
    return [n for n in names if n.isidentifier() and n not in have]


def check(model: object, names: list[str], where: str) -> None:
    """Refuse target names the model lacks, in one line naming the key and the model's own names."""
    from chainlora.errors import ChainloraError

    absent = missing(model, names)
    if absent:
        raise ChainloraError(f"{where}: lora.target_modules: {', '.join(map(repr, absent))} is not a layer of "
                             f"{type(model).__name__}; its Linear layers are {', '.join(linear_names(model))} "
                             f"(or use [{ALL_LINEAR}])")
