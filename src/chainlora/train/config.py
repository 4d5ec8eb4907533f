"""Training configuration: a YAML file in the style of LLaMA-Factory / axolotl, checked on load.

The schema is the dataclasses below; their defaults are the documented defaults. Loading is
strict: an unknown or mistyped key (with a "did you mean" hint), a wrong type or a value out
of range is ONE ChainloraError naming the file and the dotted key, so a typo never silently
trains with a default. Example: configs/demo.yaml.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from chainlora.data.prompts import DEFAULT_TASK_PROMPT, check_task_prompt
from chainlora.errors import ChainloraError
from chainlora.models import DEFAULT_MODEL


def _bounds(lo: float | None = None, hi: float | None = None, **kw: Any) -> Any:
    """A dataclass field with an allowed range, checked on load."""
    return field(metadata={"min": lo, "max": hi}, **kw)


@dataclass
class DataSettings:
    train: str = "demo"  # a data file, a hub dataset name, or "demo" (the bundled data)
    test: str | None = None  # explicit test file; else a seeded hash split of `train`
    fields: dict[str, str] = field(default_factory=dict)  # {"output": "answer", ...}
    task: str | None = None  # default task for records without one
    test_fraction: float = _bounds(0.0, 0.99, default=0.1)
    min_records: int = _bounds(1, default=1)
    max_train_per_task: int | None = _bounds(1, default=None)
    max_test_per_task: int | None = _bounds(1, default=None)


@dataclass
class LoraSettings:
    r: int = _bounds(1, 4096, default=8)
    alpha: float = _bounds(0.0, default=16.0)
    dropout: float = _bounds(0.0, 0.99, default=0.05)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class ColaSettings:
    """The residual chain (COLA, Xia et al. 2024): train a link, merge it, start a fresh one.

    The knots (optimizer steps where a link is merged) come from `knots` if given, else every
    `steps_per_link` steps, else `links` evenly spaced links (default 3) over the adapter's steps.
    """

    links: int | None = _bounds(1, 1000, default=None)  # L; default 3 when no knots are given
    steps_per_link: int | None = _bounds(1, default=None)
    knots: list[int] | None = None  # explicit optimizer steps at which links are merged
    reset_optimizer: bool = True  # fresh AdamW state for each new link
    restart_warmup_steps: int = _bounds(0, default=0)  # steps of linear LR re-warm-up after each knot
    rank_schedule: list[int] | None = None  # rank of each link, e.g. [16, 8, 4]
    init: Literal["kaiming", "gaussian"] = "kaiming"  # new link's A; B is always zero
    compress_rank: int | None = _bounds(1, default=None)  # save an SVD-truncated rank-r adapter


@dataclass
class TrainingSettings:
    max_steps: int | None = _bounds(1, default=100)  # optimizer steps per adapter
    epochs: float | None = _bounds(0.0, default=None)  # used when max_steps is null
    batch_size: int = _bounds(1, default=8)
    gradient_accumulation_steps: int = _bounds(1, default=1)
    learning_rate: float = _bounds(0.0, 1.0, default=2e-4)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = _bounds(0.0, 1.0, default=0.0)
    weight_decay: float = _bounds(0.0, default=0.0)
    max_length: int = _bounds(8, default=256)  # tokens per example (prompt + answer)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    save_steps: int = _bounds(1, default=50)  # checkpoint every N steps (resume granularity)
    logging_steps: int = _bounds(1, default=10)
    eval_batch_size: int = _bounds(1, default=16)
    method: Literal["lora", "cola"] = "lora"  # cola: the residual chain, settings in `cola`
    cola: ColaSettings = field(default_factory=ColaSettings)


TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(TrainingSettings))
COLA_KEYS = tuple(f.name for f in dataclasses.fields(ColaSettings))


@dataclass
class RouterSettings:
    enabled: bool = True
    task_prompt: str = DEFAULT_TASK_PROMPT  # must contain {instruction}; may contain {input}
    labels: dict[str, str] = field(default_factory=dict)  # task -> label (default: task name)
    max_train_per_task: int | None = _bounds(1, default=None)
    training: dict[str, Any] = field(default_factory=dict)  # overrides of `training` keys


@dataclass
class ClassifierSettings:
    """The `classifier` selector: frozen encoder + linear head (Qiu et al. Table III)."""

    enabled: bool = False
    encoder: Literal["minilm", "base"] = "minilm"  # all-MiniLM-L6-v2 (PyPI) or the base model
    max_train_per_task: int | None = _bounds(1, default=None)
    epochs: int = _bounds(1, default=300)  # full-batch steps of the linear head
    learning_rate: float = _bounds(0.0, 10.0, default=0.01)


@dataclass
class MixedSettings:
    enabled: bool = True
    # matched: the sum of all task adapters' steps (the fair comparison, Qiu et al. Table I);
    # same: one task adapter's steps; a number: exactly that many steps.
    budget: Union[Literal["matched", "same"], int] = "matched"
    training: dict[str, Any] = field(default_factory=dict)  # overrides of `training` keys


@dataclass
class Config:
    base_model: str = DEFAULT_MODEL
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    tasks: Union[Literal["all"], list[str]] = "all"
    # System message for every prompt; null keeps the chat template's own default. Recorded in
    # the library so inference renders prompts exactly as training did.
    system_prompt: str | None = None
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    router: RouterSettings = field(default_factory=RouterSettings)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    mixed: MixedSettings = field(default_factory=MixedSettings)
    output_dir: str = "runs/library"
    source: str = field(default="<dict>", repr=False, compare=False)  # where it was loaded from

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def digest(self) -> str:
        """sha256 of everything that changes what is trained (not where it is written)."""
        d = self.to_dict()
        d.pop("output_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def training_for(self, section: str) -> TrainingSettings:
        """`training` with the router's or mixed adapter's overrides applied (already checked)."""
        overrides = getattr(self, section).training if section in ("router", "mixed") else {}
        return dataclasses.replace(self.training, **overrides)


# --------------------------------------------------------------------------- checking


def _fail(source: str, key: str, message: str) -> ChainloraError:
    return ChainloraError(f"{source}: {key}: {message}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of text" if item is str else "a list of integers"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it (numbers from YAML text converted)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ChainloraError:
                continue
        raise _fail(source, key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise _fail(source, key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        item = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise _fail(source, key, f"expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, key, f"expected a mapping, got {value!r}")
        val_tp = typing.get_args(tp)[1]
        if val_tp is str and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise _fail(source, key, "expected a mapping of text to text")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(source, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(source, key, f"expected text, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r}")  # a bug in the schema


def _check_keys(known: list[str], data: dict, prefix: str, source: str) -> None:
    for k in data:
        if k not in known:
            hint = difflib.get_close_matches(str(k), known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(known)})"
            raise _fail(source, f"{prefix}{k}", f"unknown key{suggestion}")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and ranges."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(source, prefix or "(top level)", f"expected a mapping, got {data!r}")
    dotted = f"{prefix}." if prefix else ""
    fields = [f for f in dataclasses.fields(cls) if f.name != "source"]
    _check_keys([f.name for f in fields], data, dotted, source)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields:
        if f.name not in data:
            continue
        key = f"{dotted}{f.name}"
        value = _coerce(data[f.name], hints[f.name], key, source)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if lo is not None and value < lo:
                raise _fail(source, key, f"must be >= {lo}, got {value}")
            if hi is not None and value > hi:
                raise _fail(source, key, f"must be <= {hi}, got {value}")
        values[f.name] = value
    return cls(**values)


def _check_overrides(section: str, overrides: dict[str, Any], base: TrainingSettings,
                     source: str) -> dict[str, Any]:
    """Overrides use `training` keys and are checked like them; a `cola` override is merged
    key by key over `training.cola` (so `mixed.training.cola.links: 2` keeps the other keys)."""
    prefix = f"{section}.training"
    _check_keys(list(TRAINING_KEYS), overrides, f"{prefix}.", source)
    if isinstance(overrides.get("cola"), dict):
        _check_keys(list(COLA_KEYS), overrides["cola"], f"{prefix}.cola.", source)
        overrides = {**overrides, "cola": {**dataclasses.asdict(base.cola), **overrides["cola"]}}
    checked = _build(TrainingSettings, overrides, prefix, source)
    return {k: getattr(checked, k) for k in overrides}


def _check_cola(c: ColaSettings, key: str, source: str) -> None:
    """What the types cannot say: knots increase, schedules agree with the number of links."""
    if c.knots is not None:
        if not c.knots or any(k < 1 for k in c.knots) or c.knots != sorted(set(c.knots)):
            raise _fail(source, f"{key}.knots", f"expected increasing steps >= 1, got {c.knots}")
        if c.links is not None and c.links != len(c.knots) + 1:
            raise _fail(source, f"{key}.links", f"{c.links} links need {c.links - 1} knots, "
                        f"knots lists {len(c.knots)}")
    if c.knots is not None and c.steps_per_link is not None:
        raise _fail(source, f"{key}.steps_per_link", "give knots or steps_per_link, not both")
    if c.rank_schedule is not None:
        if not c.rank_schedule or any(r < 1 for r in c.rank_schedule):
            raise _fail(source, f"{key}.rank_schedule", f"expected ranks >= 1, got {c.rank_schedule}")
        n = len(c.knots) + 1 if c.knots is not None else c.links
        if n is not None and n != len(c.rank_schedule):
            raise _fail(source, f"{key}.rank_schedule", f"{len(c.rank_schedule)} ranks for {n} links")


def from_dict(data: Any, source: str = "<dict>") -> Config:
    """Check a parsed config mapping and return a Config."""
    cfg = _build(Config, data, "", source)
    cfg.source = source
    for section in ("router", "mixed"):
        part = getattr(cfg, section)
        part.training = _check_overrides(section, part.training, cfg.training, source)
    for name in ("training", "router.training", "mixed.training"):
        t = cfg.training_for(name.split(".")[0])
        if t.max_steps is None and t.epochs is None:
            raise _fail(source, f"{name}.max_steps", "set max_steps or epochs")
        _check_cola(t.cola, f"{name}.cola", source)
    try:
        check_task_prompt(cfg.router.task_prompt)
    except ChainloraError as e:
        raise ChainloraError(f"{source}: router.{e}")
    if not cfg.lora.target_modules:
        raise _fail(source, "lora.target_modules", "must name at least one module")
    if isinstance(cfg.tasks, list) and not cfg.tasks:
        raise _fail(source, "tasks", "empty list (use 'all' or name tasks)")
    if isinstance(cfg.mixed.budget, int) and cfg.mixed.budget < 1:
        raise _fail(source, "mixed.budget", f"must be >= 1, got {cfg.mixed.budget}")
    return cfg


def apply_overrides(data: Any, overrides: list[str]) -> dict:
    """Apply command-line `key.sub=value` overrides (values parsed as YAML) to a config mapping."""
    import yaml

    data = dict(data or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ChainloraError(f"--set {item!r}: expected KEY=VALUE, e.g. training.max_steps=20")
        *parents, last = key.split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ChainloraError(f"--set {key}: {'.'.join(parents[:i + 1])} is not a mapping")
            else:
                child = node[part] = dict(child)
            node = child
        try:
            node[last] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[last] = raw
    return data


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read and check a YAML config file, with optional `key=value` overrides."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChainloraError(f"{path}: config file not found")
    except (OSError, UnicodeDecodeError) as e:
        raise ChainloraError(f"{path}: cannot read config: {e}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ChainloraError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}")
    if overrides:
        data = apply_overrides(data, overrides)
    return from_dict(data, str(path))
