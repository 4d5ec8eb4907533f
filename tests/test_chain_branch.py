"""Trunk-and-branch: a shared trunk on all tasks, task adapters that continue it (warm) or learn
its residual (residual), a mixed baseline that continues the same trunk — matched compute,
plain PEFT adapters, incremental training that knows a branch depends on its trunk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import cfg_for, files, plan_lines, write_data

from chainlora.errors import ChainloraError
from chainlora.library import Library
from chainlora.train import config, train_library
from chainlora.train.plan import load_data, plan_train

TASKS = ["antonym", "sentiment", "rhyme"]
BRANCH = ["chain.trunk_steps=4", "classifier.enabled=false", "router.training.max_steps=2"]


def test_matched_compute_and_schedules():
    """Chain and mixed get the same optimizer steps and examples; the trunk holds its learning
    rate, branches decay from it without a second warm-up."""
    cfg = config.load(Path(__file__).parents[1] / "configs" / "demo.yaml",
                      ["chain.branch=warm", "chain.trunk_fraction=0.5", "training.max_steps=8",
                       "router.enabled=true"])
    jobs = {j.name: j for j in plan_train(cfg, load_data(cfg)).jobs}
    trunk, mixed = jobs["trunk"], jobs["mixed"]
    branches = [j for j in jobs.values() if j.kind == "task"]
    assert trunk.steps == sum(j.steps for j in branches) == 80  # trunk_fraction 0.5 of 160
    assert mixed.steps == sum(j.steps for j in branches) and mixed.start == "trunk"
    assert trunk.steps + mixed.steps == trunk.steps + sum(j.steps for j in branches)
    assert len(trunk.train) == sum(len(j.train) for j in branches) == len(mixed.train)
    assert trunk.settings.lr_scheduler == "constant_with_warmup" and trunk.settings.warmup_ratio == 0.1
    for j in branches + [mixed]:
        assert j.settings.warmup_ratio == 0.0 and j.settings.lr_scheduler == "cosine"
    assert all(j.start == "trunk" and j.branch == "warm" for j in branches)
    assert jobs["router"].start is None  # selectors are not branches
    paper = config.load(Path(__file__).parents[1] / "configs" / "demo.yaml",
                        ["chain.branch=none", "training.max_steps=8"])
    none = {j.name: j for j in plan_train(paper, load_data(cfg)).jobs}
    assert "trunk" not in none and none["mixed"].steps == 80 and none["mixed"].start is None


def test_replay_adds_other_tasks_records_to_branches_and_keeps_the_steps():
    demo = Path(__file__).parents[1] / "configs" / "demo.yaml"
    base = config.load(demo, ["chain.branch=warm", "training.max_steps=8"])
    cfg = config.load(demo, ["chain.branch=warm", "training.max_steps=8", "chain.replay=0.25"])
    data = load_data(cfg)
    plain = {j.name: j for j in plan_train(base, data).jobs}
    replayed = {j.name: j for j in plan_train(cfg, data).jobs}
    for name, job in replayed.items():
        if job.kind != "task":
            assert job.train == plain[name].train and job.steps == plain[name].steps  # trunk, mixed, selectors
            continue
        own = plain[name].train
        assert job.train[:len(own)] == own and job.steps == plain[name].steps
        extra = job.train[len(own):]
        assert len(extra) == round(len(own) / 3)  # 25% of the examples
        own_texts = {p.text for p in own}
        assert not any(p.text in own_texts for p in extra)  # other tasks' records
        assert job.info["branch"]["replay"] == 0.25
    with pytest.raises(ChainloraError, match=r"x.yaml: chain.replay: replays other tasks' records in branches"):
        config.from_dict({"chain": {"replay": 0.2}}, "x.yaml")


def test_bad_branch_settings_are_one_line():
    with pytest.raises(ChainloraError, match=r"x.yaml: chain.branch: expected 'none' or 'warm' or 'residual'"):
        config.from_dict({"chain": {"branch": "hot"}}, "x.yaml")
    with pytest.raises(ChainloraError, match=r"x.yaml: chain.branch: 'residual' branches continue a plain LoRA"):
        config.from_dict({"chain": {"branch": "residual"}, "training": {"method": "cola"}}, "x.yaml")
    cfg = config.from_dict({"chain": {"branch": "warm", "trunk_steps": 50}, "mixed": {"budget": 40},
                            "tasks": ["antonym"]}, "x.yaml")
    with pytest.raises(ChainloraError, match=r"mixed.budget: 40 steps do not go past the trunk's 50"):
        plan_train(cfg, load_data(cfg))


def _plain_logits_match(lib_dir: Path, model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chainlora.inference.engine import Engine

    engine = Engine.load(lib_dir, device="cpu")
    ids = engine.tok("Give the antonym of hot", return_tensors="pt")["input_ids"]
    for entry in engine.lib.entries():
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                          str(lib_dir / entry["path"])).eval()
        multi = engine.cache.acquire([entry["name"]])
        with torch.no_grad():
            a = plain(ids).logits
            b = multi(ids, adapter_names=[engine.cache.slot(entry["name"])]).logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), TASKS)


@pytest.mark.parametrize("mode,rslora", [("warm", False), ("residual", False), ("residual", True)])
def test_branch_library_is_plain_peft(mode, rslora, data, tiny_model_dir, tmp_path):
    """rsLoRA: the trunk is scaled alpha / sqrt(r) (8 / 2) where plain LoRA has alpha / r (8 / 4)."""
    lib = train_library(cfg_for(tiny_model_dir, data, TASKS, f"chain.branch={mode}", f"lora.use_rslora={rslora}",
                                *BRANCH), tmp_path / "lib")
    opened = Library.open(lib)
    trunk = opened.trunk
    assert trunk["steps"] == 4 and trunk["tasks"] == TASKS and opened.mixed["steps"] == 3 * 4
    assert opened.mixed["branch"] == {"mode": "warm", "from": "trunk", "trunk_steps": 4, "total_steps": 16}
    trunk_w = load_file(str(lib / "trunk/adapter_model.safetensors"))
    assert json.loads((lib / "trunk/adapter_config.json").read_text())["use_rslora"] is rslora
    for t in opened.tasks:
        assert t["branch"]["mode"] == mode and t["branch"]["from"] == "trunk"
        assert "trunk" in t["fingerprint"]["parts"]
        cfg = json.loads((lib / t["path"] / "adapter_config.json").read_text())
        weights = load_file(str(lib / t["path"] / "adapter_model.safetensors"))
        key = next(k for k in trunk_w if k.endswith("q_proj.lora_A.weight"))
        if mode == "residual":  # trunk ⊕ residual: rank 2r, the trunk's A as its first r rows, exactly
            assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and t["branch"]["ranks"] == [4, 4]
            assert cfg["use_rslora"] is False  # the scalings are inside B
            assert torch.equal(weights[key][:4], trunk_w[key].float())
            b_key = key.replace("lora_A", "lora_B")
            s = 8 / 2 if rslora else 8 / 4
            torch.testing.assert_close(weights[b_key][:, :4], trunk_w[b_key].float() * s, rtol=0, atol=0)
        else:  # the trunk's LoRA, trained further
            assert cfg["r"] == 4 and weights[key].shape == trunk_w[key].shape
            assert not torch.equal(weights[key], trunk_w[key])
    _plain_logits_match(lib, tiny_model_dir)
    from chainlora.eval.evaluate import compute_of
    from chainlora.eval.tables import compute_caption

    cost = compute_of(opened)  # batch 4: both systems 16 steps = 64 examples, trunk counted in both
    assert {k: (v["steps"], v["examples"], v["trunk_steps"]) for k, v in cost.items()} == {
        "chain": (16, 64, 4), "mixed": (16, 64, 4)}
    assert cost["chain"]["tokens"] > 0 and cost["mixed"]["tokens"] > 0
    assert "chain 16 steps (trunk 4 + 12), 64 examples" in compute_caption({"compute": cost})


@pytest.fixture(scope="module")
def warm_lib(data, tiny_model_dir, tmp_path_factory) -> Path:
    return train_library(cfg_for(tiny_model_dir, data, TASKS, "chain.branch=warm", *BRANCH),
                         tmp_path_factory.mktemp("warm") / "lib")


def test_a_new_task_branches_from_the_kept_trunk(warm_lib, tiny_model_dir, tmp_path, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(warm_lib, lib)
    before = files(lib)
    more = write_data(tmp_path, TASKS + ["hypernym"])
    train_library(cfg_for(tiny_model_dir, more, TASKS + ["hypernym"], "chain.branch=warm", *BRANCH), lib)
    plan = {k: a for k, (a, _) in plan_lines(capsys.readouterr().out).items()}
    assert plan == {"(trunk)": "keep", "antonym": "keep", "sentiment": "keep", "rhyme": "keep",
                    "hypernym": "train", "(router)": "retrain", "(mixed)": "retrain"}
    after = files(lib)
    assert after["trunk/adapter_model.safetensors"] == before["trunk/adapter_model.safetensors"]
    opened = Library.open(lib)
    assert opened.trunk["tasks"] == TASKS and opened.task("hypernym")["branch"]["from"] == "trunk"


@pytest.mark.slow
def test_a_new_task_keeps_a_trunk_sized_by_trunk_fraction(data, tiny_model_dir, tmp_path, capsys):
    """With chain.trunk_fraction (the demo's way) the trunk's steps follow the branches: adding a
    task must not resize, and so retrain, the trunk and every branch (found by bench/growth.py)."""
    base = [*BRANCH[1:], "chain.branch=warm", "chain.trunk_fraction=0.5"]
    lib = train_library(cfg_for(tiny_model_dir, data, TASKS, *base), tmp_path / "lib")
    before = files(lib)
    capsys.readouterr()
    more = write_data(tmp_path, TASKS + ["hypernym"])
    train_library(cfg_for(tiny_model_dir, more, TASKS + ["hypernym"], *base), lib)
    plan = {k: a for k, (a, _) in plan_lines(capsys.readouterr().out).items()}
    assert plan["(trunk)"] == "keep" and all(plan[t] == "keep" for t in TASKS) and plan["hypernym"] == "train"
    after = files(lib)
    assert all(after[f] == before[f] for f in before if f.startswith(("trunk/", "tasks/")))


def test_a_changed_trunk_retrains_its_branches(warm_lib, data, tiny_model_dir, tmp_path, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(warm_lib, lib)
    cfg = cfg_for(tiny_model_dir, data, TASKS, "chain.branch=warm", *BRANCH[1:], "chain.trunk_steps=5")
    train_library(cfg, lib, dry_run=True)
    plan = plan_lines(capsys.readouterr().out)
    assert plan["(trunk)"] == ("retrain", "changed: training settings")
    for t in TASKS:
        assert plan[t] == ("retrain", "changed: trunk")
    assert plan["(router)"][0] == "keep"
