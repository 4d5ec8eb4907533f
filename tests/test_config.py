"""Config loading: strict keys, types and ranges, one line naming the key, exit 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chainlora.cli import main
from chainlora.errors import ChainloraError
from chainlora.train import config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for name in ("demo.yaml", "tiny.yaml", "firefly.yaml", "cola.yaml"):
        cfg = config.load(REPO / "configs" / name)
        assert cfg.lora.r >= 1 and cfg.training.batch_size >= 1
    cola = config.load(REPO / "configs" / "cola.yaml")
    assert cola.training.method == "cola" and cola.training.cola.links == 3


def test_defaults_and_overrides():
    cfg = config.from_dict({"training": {"learning_rate": "2e-4"}, "router": {"training": {"max_steps": 7}}})
    assert cfg.training.learning_rate == 2e-4 and cfg.training_for("router").max_steps == 7
    assert cfg.training_for("mixed").max_steps == cfg.training.max_steps == 100
    assert cfg.tasks == "all" and cfg.mixed.budget == "matched"


def test_digest_ignores_output_dir_only():
    a = config.from_dict({"output_dir": "x"})
    assert a.digest() == config.from_dict({"output_dir": "y"}).digest()
    assert a.digest() != config.from_dict({"lora": {"r": 4}}).digest()


def test_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 5\n")
    cfg = config.load(path, overrides=["training.max_steps=9", "tasks=[a, b]", "router.enabled=false"])
    assert cfg.training.max_steps == 9 and cfg.tasks == ["a", "b"] and cfg.router.enabled is False


BAD = [
    ("trainig:\n  max_steps: 5\n", "c.yaml: trainig: unknown key (did you mean 'training'?)"),
    ("training:\n  lr: 0.1\n", "c.yaml: training.lr: unknown key"),
    ("training:\n  max_steps: five\n", "c.yaml: training.max_steps: expected an integer, got 'five'"),
    ("training:\n  batch_size: 0\n", "c.yaml: training.batch_size: must be >= 1, got 0"),
    ("lora:\n  dropout: 1.5\n", "c.yaml: lora.dropout: must be <= 0.99, got 1.5"),
    ("lora:\n  target_modules: {q: 1}\n", "c.yaml: lora.target_modules: expected a list of text"),
    ("training:\n  precision: fp8\n", "c.yaml: training.precision: expected 'fp32' or 'bf16' or 'fp16' or 'auto'"),
    ("mixed:\n  budget: lots\n", "c.yaml: mixed.budget: expected 'matched' or 'same' or an integer"),
    ("router:\n  training:\n    max_step: 3\n", "c.yaml: router.training.max_step: unknown key (did you mean 'max_steps'?)"),
    ("router:\n  training:\n    max_steps: -1\n", "c.yaml: router.training.max_steps: must be >= 1, got -1"),
    ("router:\n  task_prompt: 'no placeholder'\n", "c.yaml: router.task_prompt: the template must contain {instruction}"),
    ("training:\n  max_steps: null\n", "c.yaml: training.max_steps: set max_steps or epochs"),
    ("tasks: []\n", "c.yaml: tasks: empty list"),
    ("- just\n- a list\n", "c.yaml: (top level): expected a mapping"),
    ("training: [1, 2\n", "c.yaml:2: invalid YAML"),
    ("router:\n  enabled: yes please\n", "c.yaml: router.enabled: expected true or false"),
    # a LLaMA-Factory or axolotl YAML: their key, chainlora's spelling of the same setting
    ("lora_rank: 16\n", "c.yaml: lora_rank: unknown key (LLaMA-Factory's name; chainlora's is lora.r)"),
    ("micro_batch_size: 2\n", "c.yaml: micro_batch_size: unknown key (axolotl's name; chainlora's is training.batch_size)"),
    ("bf16: true\n", "c.yaml: bf16: unknown key (LLaMA-Factory's and axolotl's name; chainlora's is training.precision: bf16)"),
]


@pytest.mark.parametrize("text,expected", BAD)
def test_bad_config_is_one_line_exit_2(text, expected, tmp_path, capsys, monkeypatch):
    (tmp_path / "c.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert expected in err, err


def test_missing_config_and_bad_set(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "nope.yaml"]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("{}\n")
    assert main(["train", "c.yaml", "--set", "no_equals_sign"]) == 2
    assert "--set 'no_equals_sign': expected KEY=VALUE" in capsys.readouterr().err
    # a key set on the command line is that --set's fault, not the file's (issue 42, finding 7)
    assert main(["train", "c.yaml", "--set", "training.nonsense=3"]) == 2
    err = capsys.readouterr().err
    assert "--set training.nonsense=3: training.nonsense: unknown key" in err and "c.yaml" not in err
    assert main(["train", "c.yaml", "--set", "training.lerning_rate=1e-3"]) == 2
    assert "--set training.lerning_rate=1e-3: training.lerning_rate: unknown key (did you mean 'learning_rate'?)" \
        in capsys.readouterr().err
    assert main(["train", "c.yaml", "--set", "lora.r=0"]) == 2
    assert "--set lora.r=0: lora.r: must be >= 1" in capsys.readouterr().err
    (tmp_path / "d.yaml").write_text("training: {lerning_rate: 1}\n")  # the file's own typo stays the file's
    assert main(["train", "d.yaml", "--set", "training.max_steps=3"]) == 2
    assert "d.yaml: training.lerning_rate: unknown key" in capsys.readouterr().err


def test_unknown_task_in_config(tmp_path, capsys, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(f"base_model: {tiny_model_dir}\ntasks: [antonym, telepathy]\n")
    assert main(["train", "c.yaml"]) == 2
    assert "c.yaml: tasks: unknown task 'telepathy' (data has: antonym," in capsys.readouterr().err


def test_router_label_checks():
    from chainlora.train.plan import labels_for

    cfg = config.from_dict({"router": {"labels": {"a": "same", "b": "same"}}})
    with pytest.raises(ChainloraError, match="router.labels.b: label 'same' also names 'a'"):
        labels_for(cfg, ["a", "b"])
    cfg = config.from_dict({"router": {"labels": {"zzz": "x"}}})
    with pytest.raises(ChainloraError, match="router.labels.zzz: not a trained task"):
        labels_for(cfg, ["a"])


# Measured on the dataclass implementation (before pydantic, commit 994c540). Adapter
# fingerprints decide what retrains: a different one retrains every adapter of every user's
# library, so change them only together with FINGERPRINT_VERSION, never to follow code. The
# config digest is only recorded (a new digest rewrites the manifest, nothing retrains); it is
# pinned over the keys that existed then, so the old keys still load to the same values. Keys
# added since (`chain`, trunk-and-branch; `encoder`, `sft`, `selection`: issue 15) are left out of that digest.
ADDED_SINCE = ("chain", "encoder", "sft", "selection", "discover")
OVERRIDES = {  # every section, numbers as ints and as YAML 1.1 text, cola merged key by key
    "tasks": ["antonym", "hypernym"], "system_prompt": "Be brief.",
    "data": {"fields": {"output": "answer"}, "task": "t", "test_fraction": 0, "max_train_per_task": 50},
    "lora": {"r": 4, "alpha": 8, "dropout": 0, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    "training": {"method": "cola", "learning_rate": "2e-4", "epochs": 2, "max_steps": None, "weight_decay": 0,
                 "cola": {"links": 3, "restart_warmup_steps": 2, "rank_schedule": [8, 4, 2]}},
    "router": {"labels": {"antonym": "opposite"},
               "training": {"max_steps": 7, "method": "lora", "learning_rate": 1,
                            "cola": {"links": 2, "rank_schedule": None}}},
    "classifier": {"enabled": True, "epochs": 10, "learning_rate": 1},
    "mixed": {"budget": 30, "training": {"cola": {"knots": [3, 6], "links": None, "rank_schedule": None},
                                         "warmup_ratio": "1e-1"}},
    "output_dir": "runs/x",
}
PINNED = {  # name: (digest(), sha256 of json.dumps(to_dict()), fingerprint of a job with the mixed settings)
    "default": ("2e8be4c0e9f6c13bbf9bde02326b0d45ebe4f4d0061b6f2b437f2f54b6d5d958",
                "ea168cb1104df0e5133706996ac5192f1fa2f8935704fbb79f5adb9fde12e7cc",
                "61a05a77a743e63547292fd46dd44c3ed43a56c1110aa11ad1c120e0bef0bcb3"),
    # demo: re-pinned when the demo config itself changed (training.max_steps 8 -> 4 a branch; then
    # issue 36: no router, encoder on 64 instructions a task, 8 test-loss records) — the adapter
    # fingerprint (third) is unchanged: the training settings are the same
    "demo": ("c1508933878c9a88fb0e67be78d892659ea78c1027b3cd8c7a00ef1d802722e7",
             "f0d1a95f65d399ee3973a22efaee7e6947fd95ef4008614d5009d6d972bb23a7",
             "41fb5890a45711156cc323d99cd95c516917c42ba97594d3a90ea5fdf375677a"),
    "overrides": ("6ae7c9aee6333466fd792c9f81840521f2a9323d53da577fb21c4e116e6e2dab",
                  "2804f9ecdfd377a6b295d09a5e2a05d6e81ccb8c3b467f5ec725f2cd1b1528ad",
                  "96189907de19457263fa9e8b647760156cab523c92978385213b2474169190db"),
}
# The same job's fingerprint by version 2's rule (changes.py: FINGERPRINT_VERSION), measured when
# it was introduced (2026-12-07); libraries version 1 wrote are compared by the pins above.
PINNED_V2 = {
    "default": "5371589a1adef68e38eb1613e9729b54a6a8ba7a6aa928c52dbd6e4d926bbebc",
    "demo": "9753955029d53757c3ce85eb295e3d132b4f13788fccbf23c570f914208507fe",
    "overrides": "5bd9f5f1d39efa8a55ce7da7f746434d682774968494404f003720c7d1327da0",
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_digest_and_to_dict_are_those_of_existing_libraries(name):
    import hashlib
    import json

    from chainlora.train.changes import BaseFiles, fingerprint
    from chainlora.train.plan import Job

    cfg = {"default": lambda: config.from_dict({}), "demo": lambda: config.load(REPO / "configs" / "demo.yaml"),
           "overrides": lambda: config.from_dict(OVERRIDES)}[name]()
    job = Job("task", "t", "task/t", [], [], cfg.training_for("mixed"), steps=10)  # mixed settings
    old = {k: v for k, v in cfg.to_dict().items() if k not in ADDED_SINCE}
    digest = hashlib.sha256(json.dumps({k: v for k, v in old.items() if k != "output_dir"},
                                       sort_keys=True).encode()).hexdigest()
    base = BaseFiles("sha256:abc", "tok")
    measured = (digest, hashlib.sha256(json.dumps(old).encode()).hexdigest(),
                fingerprint(job, cfg, base, 1, version=1)["sha256"])
    assert measured == PINNED[name]  # version 1's rule still gives what libraries it wrote hold
    assert fingerprint(job, cfg, base, 1)["sha256"] == PINNED_V2[name]


def test_use_rslora_keeps_existing_libraries_and_retrains_when_on():
    """Off (the default), lora.use_rslora is out of the config's digest and every fingerprint, so
    a library trained before the key existed keeps all its adapters; on, the LoRA part changes."""
    from chainlora.train.changes import BaseFiles, fingerprint
    from chainlora.train.plan import Job

    off, on = config.from_dict({}), config.from_dict({"lora": {"use_rslora": True}})
    assert "use_rslora" not in off.to_dict()["lora"] and on.to_dict()["lora"]["use_rslora"] is True
    assert on.digest() != off.digest()  # off: the pinned digests above are unchanged
    job = Job("task", "t", "task/t", [], [], off.training_for("mixed"), steps=10)
    a, b = (fingerprint(job, c, BaseFiles("sha256:abc", "tok"), 1) for c in (off, on))
    assert a["sha256"] == PINNED_V2["default"]
    assert [k for k in a["parts"] if a["parts"][k] != b["parts"][k]] == ["LoRA settings"]


def test_every_foreign_key_names_a_chainlora_key_and_shadows_none():
    """The LLaMA-Factory / axolotl table: each target resolves to a field of the schema, and no
    foreign name is one of chainlora's own top-level keys (it is only read for unknown keys)."""
    from pydantic import BaseModel

    from chainlora.train.config_check import FOREIGN, TOOLS

    for name, (tool, ours) in FOREIGN.items():
        assert tool in TOOLS and name not in config.Config.model_fields, name
        words = re.split(r"[ ,():]+", ours)  # the first word and every dotted word are keys
        for target in [words[0]] + [w for w in words[1:] if "." in w]:
            model: type[BaseModel] = config.Config
            for part in target.split("."):
                assert part in model.model_fields, (name, target)
                ann = model.model_fields[part].annotation
                model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else config.Config


def test_a_foreign_key_inside_a_section_is_answered_only_for_that_section():
    with pytest.raises(ChainloraError, match=r"training.num_train_epochs: unknown key \(LLaMA-Factory's name; "
                                             r"chainlora's is training.epochs, with training.max_steps: null\)"):
        config.from_dict({"training": {"num_train_epochs": 3}}, "x.yaml")
    with pytest.raises(ChainloraError, match=r"router.training.num_train_epochs: unknown key \(known: max_steps, epochs"):
        config.from_dict({"router": {"training": {"num_train_epochs": 3}}}, "x.yaml")


def test_target_modules_may_be_one_name():
    """`target_modules: all-linear` (PEFT's spelling, a string) reads as a list of one."""
    assert config.from_dict({"lora": {"target_modules": "all-linear"}}).lora.target_modules == ["all-linear"]
