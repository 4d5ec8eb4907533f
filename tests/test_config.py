"""Config loading: strict keys, types and ranges, one line naming the key, exit 2."""

from __future__ import annotations

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
    ("lora:\n  target_modules: q_proj\n", "c.yaml: lora.target_modules: expected a list of text"),
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
    assert main(["train", "c.yaml", "--set", "training.nonsense=3"]) == 2
    assert "c.yaml: training.nonsense: unknown key" in capsys.readouterr().err


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
