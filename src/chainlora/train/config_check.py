"""One line for a config's first problem: pydantic's complaint explained in the schema's words.

pydantic checks keys, types and ranges; this module follows its error location through the
schema and the data to name the dotted key, what it accepts and what it got, with a "did you
mean" hint for a mistyped key (chainlora's spelling for a LLaMA-Factory or axolotl key). Used
by train/config.py for every section of the YAML.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError

from chainlora.errors import ChainloraError


class ConfigError(ChainloraError):
    """A config's problem at one dotted key: `FILE: dotted.key: what is wrong`. The key and the
    complaint are kept apart so a key set on the command line is blamed on its `--set`."""

    def __init__(self, source: str, key: str, message: str):
        super().__init__(f"{source}: {key}: {message}")
        self.key, self.problem = key, message


# Keys of a LLaMA-Factory (LF) or axolotl (AX) training YAML, at the top level where those tools put
# them, and what chainlora calls the same setting: a user's first config is often one of theirs.
EPOCHS = "training.epochs, with training.max_steps: null"
VAL = ("data.test_fraction (the held-out test share) or training.early_stopping.validation_per_task "
       "(validation records a task)")
FOREIGN = {
    "model_name_or_path": ("LF", "base_model"), "dataset": ("LF", "data.train"),
    "datasets": ("AX", "data.train"), "val_size": ("LF", VAL),
    "val_set_size": ("AX", VAL), "lora_rank": ("LF", "lora.r"), "lora_r": ("AX", "lora.r"),
    "lora_alpha": ("LF, AX", "lora.alpha"), "lora_dropout": ("LF, AX", "lora.dropout"),
    "lora_target": ("LF", "lora.target_modules"), "lora_target_modules": ("AX", "lora.target_modules"),
    "use_rslora": ("LF", "lora.use_rslora"), "peft_use_rslora": ("AX", "lora.use_rslora"),
    "learning_rate": ("LF, AX", "training.learning_rate"), "num_train_epochs": ("LF", EPOCHS),
    "num_epochs": ("AX", EPOCHS), "max_steps": ("LF, AX", "training.max_steps"),
    "per_device_train_batch_size": ("LF", "training.batch_size"), "micro_batch_size": ("AX", "training.batch_size"),
    "gradient_accumulation_steps": ("LF, AX", "training.gradient_accumulation_steps"),
    "lr_scheduler_type": ("LF", "training.lr_scheduler"), "lr_scheduler": ("AX", "training.lr_scheduler"),
    "warmup_ratio": ("LF, AX", "training.warmup_ratio"), "weight_decay": ("LF, AX", "training.weight_decay"),
    "cutoff_len": ("LF", "training.max_length"), "sequence_len": ("AX", "training.max_length"),
    "seed": ("LF, AX", "training.seed"), "bf16": ("LF, AX", "training.precision: bf16"),
    "fp16": ("LF, AX", "training.precision: fp16"), "quantization_bit": ("LF", "base_quantization: 4bit or 8bit"),
    "load_in_4bit": ("AX", "base_quantization: 4bit"), "load_in_8bit": ("AX", "base_quantization: 8bit"),
    "gradient_checkpointing": ("LF, AX", "training.gradient_checkpointing"),
    "early_stopping_patience": ("AX", "training.early_stopping.patience, with training.early_stopping.enabled: true"),
    "save_steps": ("LF, AX", "training.save_steps"), "logging_steps": ("LF, AX", "training.logging_steps"),
}
TOOLS = {"LF": "LLaMA-Factory's", "AX": "axolotl's", "LF, AX": "LLaMA-Factory's and axolotl's"}


def fail(source: str, key: str, message: str) -> ConfigError:
    """The one-line error: `FILE: dotted.key: what is wrong`."""
    return ConfigError(source, key, message)


def _optional_of(tp: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1 else tp


def _describe(tp: Any) -> str:
    """What an annotation accepts, in the words of the error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _describe(args[0])
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return "a list of text" if args[0] is str else "a list of integers"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}[tp]


def _locate(model: type[BaseModel], loc: tuple, data: Any, key: str) -> tuple[str, Any, Any, tuple]:
    """Follow pydantic's error location through the schema and the data, as far as it names
    fields and list items: the dotted key, its annotation, its value, and what is left (an
    unknown key, a union member's tag, a key inside a mapping)."""
    tp: Any = model
    for i, part in enumerate(loc):
        inner = _optional_of(tp)
        if isinstance(inner, type) and issubclass(inner, BaseModel) and part in inner.model_fields:
            tp, key = inner.model_fields[part].annotation, f"{key}.{part}" if key else part
        elif isinstance(part, int) and typing.get_origin(inner) is list:
            tp, key = typing.get_args(inner)[0], f"{key}[{part}]"
        else:
            return key, tp, data, loc[i:]
        data = data[part]
    return key, tp, data, ()


def _explain(error: ValidationError, model: type[BaseModel], data: Any, prefix: str,
             source: str) -> ChainloraError:
    """pydantic's first complaint (an unknown key first: a typo explains the rest) as one line."""
    errors = error.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    err = min(unknown, key=lambda e: len(e["loc"])) if unknown else errors[0]
    key, tp, value, rest = _locate(model, err["loc"], data, prefix)
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        dotted = f"{key}.{rest[0]}" if key else str(rest[0])
        tool, ours = FOREIGN.get(str(rest[0]), ("", ""))
        if ours and (not key or ours.startswith(f"{key}.")):  # at the top level, or in its own section
            return fail(source, dotted, f"unknown key ({TOOLS[tool]} name; chainlora's is {ours})")
        known = list(tp.model_fields)
        hint = difflib.get_close_matches(str(rest[0]), known, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(known)})"
        return fail(source, dotted, f"unknown key{suggestion}")
    bounds = {"greater_than_equal": (">=", "ge"), "less_than_equal": ("<=", "le"),
              "greater_than": (">", "gt"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, bound = bounds[kind][0], ctx[bounds[kind][1]]
        got = float(value) if isinstance(bound, float) else value  # float fields have float bounds
        return fail(source, key, f"must be {op} {bound}, got {got}")
    if rest and typing.get_origin(tp) is dict:  # a key or value inside the mapping
        return fail(source, key, "expected a mapping of text to text")
    return fail(source, key or "(top level)", f"expected {_describe(tp)}, got {value!r}")


def validate(model: type[BaseModel], data: Any, source: str, prefix: str = "") -> Any:
    """`model` built from `data`, or the one-line ChainloraError saying what is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _explain(e, model, data, prefix, source) from None
