"""Training configuration: a YAML file in the style of LLaMA-Factory / axolotl, checked on load.

The schema is the pydantic models below; their defaults are the documented defaults. Loading is
strict: an unknown or mistyped key (with a "did you mean" hint), a wrong type or a value out
of range is ONE ChainloraError naming the file and the dotted key, so a typo never silently
trains with a default. Example: configs/demo.yaml.

pydantic checks keys, types and ranges (strict: an integer is never true, 8.5 or "8");
train/config_check.py turns its first complaint into that one line, in words taken from the schema.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator

from chainlora.data.prompts import DEFAULT_TASK_PROMPT, check_task_prompt
from chainlora.errors import ChainloraError
from chainlora.library import kinds
from chainlora.base_model import DEFAULT_MODEL
from chainlora.train.config_check import ConfigError, fail, validate


def _number(value: Any) -> Any:
    """YAML 1.1 reads 2e-4 (no dot) as text and 16 as an integer: both are numbers here."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            pass
    return value


Number = Annotated[float, BeforeValidator(_number)]


class _Section(BaseModel):
    """A config section: strict types, no unknown keys; an empty one (`lora:`) means the defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        return {} if data is None else data


class DataSettings(_Section):
    train: str = "demo"  # a data file, a hub dataset name, or "demo" (the bundled data)
    test: str | None = None  # explicit test file; else a seeded hash split of `train`
    fields: dict[str, str] = Field(default_factory=dict)  # {"output": "answer", ...}
    task: str | None = None  # default task for records without one
    test_fraction: Number = Field(0.1, ge=0.0, le=0.99)
    min_records: int = Field(1, ge=1)
    max_train_per_task: int | None = Field(None, ge=1)
    max_test_per_task: int | None = Field(None, ge=1)


class LoraSettings(_Section):
    r: int = Field(8, ge=1, le=4096)
    alpha: Number = Field(16.0, ge=0.0)
    dropout: Number = Field(0.05, ge=0.0, le=0.99)
    use_rslora: bool = False  # B A scaled alpha / sqrt(r) (rsLoRA): a high rank at a fixed alpha keeps learning
    # the model's own Linear names (q_proj, v_proj: llama, Gemma, Qwen, Mistral), or all-linear
    target_modules: Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = Field(
        default_factory=lambda: ["q_proj", "v_proj"])


class ColaSettings(_Section):
    """The residual chain (COLA, Xia et al. 2024): train a link, merge it, start a fresh one.

    The knots (optimizer steps where a link is merged) come from `knots` if given, else every
    `steps_per_link` steps, else `links` evenly spaced links (default 3) over the adapter's steps.
    """

    links: int | None = Field(None, ge=1, le=1000)  # L; default 3 when no knots are given
    steps_per_link: int | None = Field(None, ge=1)
    knots: list[int] | None = None  # explicit optimizer steps at which links are merged
    reset_optimizer: bool = True  # fresh AdamW state for each new link
    restart_warmup_steps: int = Field(0, ge=0)  # steps of linear LR re-warm-up after each knot
    rank_schedule: list[int] | None = None  # rank of each link, e.g. [16, 8, 4]
    init: Literal["kaiming", "gaussian"] = "kaiming"  # new link's A; B is always zero
    compress_rank: int | None = Field(None, ge=1)  # save an SVD-truncated rank-r adapter


class EarlyStoppingSettings(_Section):
    """Each answer adapter (task, trunk, mixed) stopped at its best validation loss: every
    `validation_per_task` records a task are held out of ALL training (so the mixed adapter is
    chosen on the same data as the task adapters), the loss on them is measured every
    `eval_steps` optimizer steps, and the adapter saved is the checkpoint where it was lowest.
    `patience`: stop after that many evaluations without a new best (null: run to max_steps)."""

    enabled: bool = False
    validation_per_task: int = Field(16, ge=1)
    eval_steps: int = Field(10, ge=1)
    patience: int | None = Field(None, ge=1)


class TrainingSettings(_Section):
    max_steps: int | None = Field(100, ge=1)  # optimizer steps per adapter
    epochs: Number | None = Field(None, ge=0.0)  # used when max_steps is null
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: Number = Field(2e-4, ge=0.0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Number = Field(0.0, ge=0.0, le=1.0)
    weight_decay: Number = Field(0.0, ge=0.0)
    max_length: int = Field(256, ge=8)  # tokens per example (prompt + answer)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, same weights
    save_steps: int = Field(50, ge=1)  # checkpoint every N steps (resume granularity)
    logging_steps: int = Field(10, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    method: Literal["lora", "cola"] = "lora"  # cola: the residual chain, settings in `cola`
    cola: ColaSettings = Field(default_factory=ColaSettings)
    early_stopping: EarlyStoppingSettings = Field(default_factory=EarlyStoppingSettings)


TRAINING_KEYS = tuple(TrainingSettings.model_fields)
COLA_KEYS = tuple(ColaSettings.model_fields)


class RouterSettings(_Section):
    enabled: bool = True
    task_prompt: str = DEFAULT_TASK_PROMPT  # must contain {instruction}; may contain {input}
    labels: dict[str, str] = Field(default_factory=dict)  # task -> label (default: task name)
    max_train_per_task: int | None = Field(None, ge=1)
    training: dict[str, Any] = Field(default_factory=dict)  # overrides of `training` keys


class ClassifierSettings(_Section):
    """The `classifier` selector: frozen encoder + linear head (Qiu et al. Table III)."""

    enabled: bool = False
    encoder: Literal["minilm", "base"] = "minilm"  # all-MiniLM-L6-v2 (PyPI) or the base model
    max_train_per_task: int | None = Field(None, ge=1)
    epochs: int = Field(300, ge=1)  # full-batch steps of the linear head
    learning_rate: Number = Field(0.01, ge=0.0, le=10.0)


class EncoderSettings(_Section):
    """The `encoder` selector (Qiu et al. Table III, "BERT-SFT"): all-MiniLM-L6-v2 fine-tuned end
    to end with a classification head, by the Trainer."""

    enabled: bool = False
    max_train_per_task: int | None = Field(None, ge=1)
    epochs: Number = Field(3.0, gt=0.0)
    batch_size: int = Field(32, ge=1)
    learning_rate: Number = Field(5e-5, ge=0.0, le=1.0)
    max_length: int = Field(64, ge=8)  # tokens of the instruction the encoder reads
    # share of the training instructions whose content words (a template's rare fillers) are swapped for
    # other records' (chainlora.data.content); off by default: within noise of off (bench/selector_cv.py)
    swap_content: Number = Field(0.0, ge=0.0, le=1.0)


class SftSettings(_Section):
    """The `sft` selector (Qiu et al. Table III, "Bloomz-SFT", the paper's best): the whole base
    model fine-tuned on task_prompt -> label, ranking labels like `score`. A full model copy on
    disk (540 MB for SmolLM2-135M in fp32), so opt-in. Reads router.task_prompt / router.labels."""

    enabled: bool = False
    max_train_per_task: int | None = Field(None, ge=1)
    training: dict[str, Any] = Field(default_factory=dict)  # overrides of `training` keys


class SelectionSettings(_Section):
    """Choosing the library's default selector at train time, by measurement on validation data
    no selector trained on: records held out of the train split, and whole instruction templates
    (records' meta "template") held out, so unseen wording is measured. The winner, a calibrated
    confidence threshold and an out-of-library detector are recorded in the manifest."""

    enabled: bool = True
    validation_per_task: int = Field(16, ge=0)  # records a task from seen templates (and as many from held-out ones)
    heldout_templates: int = Field(1, ge=0)  # templates a task no selector trains on (tasks with >= 3 templates)
    precision: Number = Field(0.99, gt=0.0, le=1.0)  # accepted validation routes must be this right
    novelty: bool = True  # out-of-library detector: similarity to the selectors' training instructions
    novelty_method: Literal["mahalanobis", "knn"] = "mahalanobis"  # nearest task mean, or k-th nearest instruction
    novelty_recall: Number = Field(0.99, gt=0.0, le=1.0)  # in-library validation instructions it must accept
    # the detector's sentence space: auto = the fine-tuned `encoder` selector's where the library
    # trains one (it has learnt the tasks' varied wording), else frozen; frozen = all-MiniLM-L6-v2
    novelty_space: Literal["auto", "frozen"] = "auto"
    default: str = "auto"  # auto: measured best; else a selector of chainlora.library.kinds (checked below)
    # which trained selectors to measure (all, or a list): `generate` beam-searches every
    # validation instruction, the slowest part of the measurement on a CPU
    selectors: Union[Literal["all"], list[str]] = "all"  # selectors of chainlora.library.kinds (checked below)
    # extra phrasings a task that only the selectors and the out-of-library detector learn from:
    # a JSONL file of {"task", "instruction"} ("demo": the bundled one); a {word} slot is filled
    # `instructions_per_template` times with words of every task's records (data/selector_instructions.py)
    instructions: str | None = None
    instructions_per_template: int = Field(25, ge=1)


class MixedSettings(_Section):
    enabled: bool = True
    # matched: the sum of all task adapters' steps (the fair comparison, Qiu et al. Table I);
    # same: one task adapter's steps; a number: exactly that many steps.
    budget: Union[Literal["matched", "same"], int] = "matched"
    training: dict[str, Any] = Field(default_factory=dict)  # overrides of `training` keys


class ChainSettings(_Section):
    """How the routed chain's task adapters start: from zero (the paper), or as branches of a
    shared trunk — one LoRA trained first on all tasks' data at a constant learning rate; each
    task adapter then continues it on its own task through the decay (a warmup-stable-decay
    schedule split at the end of the stable phase). The mixed baseline continues the same
    trunk on all tasks, so both systems get the same optimizer steps and examples.
    """

    # none: task adapters from zero (Qiu et al.); warm: each task continues the trunk's LoRA;
    # residual: the trunk is merged into W (a COLA knot) and a fresh LoRA learns the rest —
    # saved as ONE plain PEFT LoRA of rank 2r (trunk and residual concatenated, exactly).
    branch: Literal["none", "warm", "residual"] = "none"
    # Trunk optimizer steps: a number, or (null) trunk_fraction of the chain's total steps.
    # A fixed number keeps the trunk when tasks are added (only the new branch trains).
    trunk_steps: int | None = Field(None, ge=1)
    trunk_fraction: Number = Field(0.5, gt=0.0, lt=1.0)
    # share of each branch's training examples drawn from the other tasks' records (same steps and
    # batch, so the compute is unchanged): a branch keeps some of what it shares with its neighbours
    replay: Number = Field(0.0, ge=0.0, lt=1.0)
    # the per-task gate (chainlora.train.gate): hold out `gate_per_task` training records a task from
    # every adapter; after training, a task whose own adapter does not beat the mixed adapter on them
    # is answered by the mixed adapter when routed to (a task asked for by name still gets its own)
    gate: bool = False
    gate_per_task: int = Field(32, ge=1)


class DiscoverSettings(_Section):
    """`tasks: auto`: the records' task labels come from `chainlora discover`'s clustering of the
    train (and test) records, their own task fields ignored (chainlora.discover)."""

    k: Union[Literal["auto"], int] = "auto"  # auto: the largest k whose clusters differ in their answers
    min_size: int = Field(10, ge=1)  # smaller clusters join the nearest other one


class Config(_Section):
    base_model: str = DEFAULT_MODEL
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    base_quantization: Literal["4bit", "8bit"] | None = None  # QLoRA by bitsandbytes (chainlora.quantization)
    # all: every task of the data; auto: tasks discovered from unlabelled data (`discover`)
    tasks: Union[Literal["all", "auto"], list[str]] = "all"
    # System message for every prompt (null: the chat template's default); the library records it for inference
    system_prompt: str | None = None
    data: DataSettings = Field(default_factory=DataSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    sft: SftSettings = Field(default_factory=SftSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    mixed: MixedSettings = Field(default_factory=MixedSettings)
    chain: ChainSettings = Field(default_factory=ChainSettings)
    discover: DiscoverSettings = Field(default_factory=DiscoverSettings)
    output_dir: str = "runs/library"
    _source: str = PrivateAttr("<dict>")

    @property
    def source(self) -> str:
        """Where it was loaded from (for messages); not a key, not in to_dict()."""
        return self._source

    @source.setter
    def source(self, value: str) -> None:
        self._source = value

    def to_dict(self) -> dict[str, Any]:
        """The config as data (the manifest records it; `digest` hashes it). A key added later is
        left out while at its default, so existing libraries keep their digest and manifest."""
        d = self.model_dump()
        if d["training"]["early_stopping"] == EarlyStoppingSettings().model_dump():
            del d["training"]["early_stopping"]
        for part, key in ((d, "base_quantization"), (d["training"], "gradient_checkpointing"),
                          (d["lora"], "use_rslora")):
            if not part[key]:
                del part[key]
        return d

    def digest(self) -> str:
        """sha256 of everything that changes what is trained (not where it is written)."""
        d = self.to_dict()
        d.pop("output_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def training_for(self, section: str) -> TrainingSettings:
        """`training` with the router's or mixed adapter's overrides applied (already checked)."""
        overrides = getattr(self, section).training if section in override_sections() else {}
        return self.training.model_copy(update=overrides)


def override_sections() -> list[str]:
    """The config sections with `training` overrides of their own (router, mixed, sft)."""
    return [name for name, f in Config.model_fields.items() if isinstance(f.annotation, type)
            and issubclass(f.annotation, BaseModel) and "training" in f.annotation.model_fields]


# --------------------------------------------------------------------------- checking


def _check_overrides(section: str, overrides: dict[str, Any], base: TrainingSettings,
                     source: str) -> dict[str, Any]:
    """Overrides use `training` keys and are checked like them; a `cola` override is merged
    key by key over `training.cola` (so `mixed.training.cola.links: 2` keeps the other keys)."""
    for key in ("cola", "early_stopping"):
        if isinstance(overrides.get(key), dict):
            overrides = {**overrides, key: {**getattr(base, key).model_dump(), **overrides[key]}}
    checked = validate(TrainingSettings, overrides, source, f"{section}.training")
    return {k: getattr(checked, k) for k in overrides}


def _check_cola(c: ColaSettings, key: str, source: str) -> None:
    """What the types cannot say: knots increase, schedules agree with the number of links."""
    if c.knots is not None:
        if not c.knots or any(k < 1 for k in c.knots) or c.knots != sorted(set(c.knots)):
            raise fail(source, f"{key}.knots", f"expected increasing steps >= 1, got {c.knots}")
        if c.links is not None and c.links != len(c.knots) + 1:
            raise fail(source, f"{key}.links", f"{c.links} links need {c.links - 1} knots, "
                        f"knots lists {len(c.knots)}")
    if c.knots is not None and c.steps_per_link is not None:
        raise fail(source, f"{key}.steps_per_link", "give knots or steps_per_link, not both")
    if c.rank_schedule is not None:
        if not c.rank_schedule or any(r < 1 for r in c.rank_schedule):
            raise fail(source, f"{key}.rank_schedule", f"expected ranks >= 1, got {c.rank_schedule}")
        n = len(c.knots) + 1 if c.knots is not None else c.links
        if n is not None and n != len(c.rank_schedule):
            raise fail(source, f"{key}.rank_schedule", f"{len(c.rank_schedule)} ranks for {n} links")


def _check_selectors(s: SelectionSettings, source: str) -> None:
    """Selector names come from the registry (chainlora.library.kinds), which a plug-in may extend."""
    names = kinds.selector_names()
    known = " or ".join(repr(n) for n in ("auto", *names))
    if s.default not in ("auto", *names):
        raise fail(source, "selection.default", f"expected {known}, got {s.default!r}")
    for i, name in enumerate(s.selectors if isinstance(s.selectors, list) else []):
        if name not in names:
            raise fail(source, f"selection.selectors[{i}]", f"expected {' or '.join(map(repr, names))}, got {name!r}")


def from_dict(data: Any, source: str = "<dict>") -> Config:
    """Check a parsed config mapping and return a Config."""
    cfg = validate(Config, data, source)
    cfg.source = source
    for section in override_sections():
        part = getattr(cfg, section)
        part.training = _check_overrides(section, part.training, cfg.training, source)
    for name in ["training", *(f"{section}.training" for section in override_sections())]:
        t = cfg.training_for(name.split(".")[0])
        if t.max_steps is None and t.epochs is None:
            raise fail(source, f"{name}.max_steps", "set max_steps or epochs")
        _check_cola(t.cola, f"{name}.cola", source)
    _check_selectors(cfg.selection, source)
    try:
        check_task_prompt(cfg.router.task_prompt)
    except ChainloraError as e:
        raise ChainloraError(f"{source}: router.{e}")
    if not cfg.lora.target_modules:
        raise fail(source, "lora.target_modules", "must name at least one module")
    if isinstance(cfg.tasks, list) and not cfg.tasks:
        raise fail(source, "tasks", "empty list (use 'all' or name tasks)")
    if isinstance(cfg.discover.k, int) and cfg.discover.k < 1:
        raise fail(source, "discover.k", f"must be >= 1, got {cfg.discover.k}")
    if isinstance(cfg.mixed.budget, int) and cfg.mixed.budget < 1:
        raise fail(source, "mixed.budget", f"must be >= 1, got {cfg.mixed.budget}")
    if cfg.chain.gate and not cfg.mixed.enabled:
        raise fail(source, "chain.gate", "compares each task adapter with the mixed adapter; "
                    "set mixed.enabled: true (or chain.gate: false)")
    if cfg.chain.replay and cfg.chain.branch == "none":
        raise fail(source, "chain.replay", "replays other tasks' records in branches of a trunk; "
                    "set chain.branch: warm or residual (or chain.replay: 0)")
    for name in ("training", "mixed.training"):
        t = cfg.training_for(name.split(".")[0])
        if t.early_stopping.enabled and t.method == "cola":
            raise fail(source, f"{name}.early_stopping", "not with method: cola (a checkpoint from before a "
                       "knot cannot be restored once the link is merged); use method: lora")
    if cfg.chain.branch != "none" and "cola" in (cfg.training.method, cfg.training_for("mixed").method):
        raise fail(source, "chain.branch", f"{cfg.chain.branch!r} branches continue a plain LoRA trunk; "
                    "use training.method: lora (or chain.branch: none)")
    cola = [name for name in ("training", "router.training", "mixed.training")
            if cfg.training_for(name.split(".")[0]).method == "cola"]
    why = (cola and f"{cola[0]}.method: cola merges each link into them" or cfg.chain.branch == "residual"
           and "chain.branch: residual merges the trunk into them" or cfg.sft.enabled and "sft.enabled trains them")
    if cfg.base_quantization and why:
        raise fail(source, "base_quantization", f"{cfg.base_quantization} base weights cannot change ({why}); "
                   "use base_quantization: null with it")
    return cfg


def apply_overrides(data: Any, overrides: list[str]) -> dict:
    """Apply command-line `key.sub=value` overrides (values parsed as YAML) to a config mapping;
    the mappings on the way are copied, so `data` itself is left as it was."""
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
            if child is not None and not isinstance(child, dict):
                raise ChainloraError(f"--set {key}: {'.'.join(parents[:i + 1])} is not a mapping")
            node[part] = dict(child or {})
            node = node[part]
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
    if not overrides:
        return from_dict(data, str(path))
    try:
        return from_dict(apply_overrides(data, overrides), str(path))
    except ConfigError as e:
        raise blame_override(e, overrides) from None


def blame_override(error: ConfigError, overrides: list[str]) -> ChainloraError:
    """The error named after the `--set` that caused it, when the offending key was set there
    (the last such `--set` wins, as it does when applied); else the error as it was."""
    for item in reversed(overrides):
        key = item.partition("=")[0]
        if error.key == key or error.key.startswith(key + ".") or key.startswith(error.key + "."):
            return ChainloraError(f"--set {item}: {error.key}: {error.problem}")
    return error
