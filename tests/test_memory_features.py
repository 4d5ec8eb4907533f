"""The memory features (issue 41): gradient checkpointing, bf16 mixed precision on CPU, QLoRA
(`base_quantization: 4bit | 8bit` by bitsandbytes), their config keys and fingerprints. Tiny model,
CPU; the QLoRA tests run where bitsandbytes runs a quantised layer on the CPU, else they skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cfg_for, plan_lines, write_data
from safetensors.torch import load_file

from chainlora import quantization
from chainlora.errors import ChainloraError
from chainlora.train import config, train_library

ONE_TASK = ("router.enabled=false", "mixed.enabled=false", "classifier.enabled=false", "selection.enabled=false")


def _bnb_runs(mode: str) -> str | None:
    try:
        quantization.check(mode, "cpu")
    except ChainloraError as e:
        return str(e)
    return None


needs_bnb = pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.skipif(
    _bnb_runs(m) is not None, reason=f"bitsandbytes {m} does not run on this CPU: {_bnb_runs(m)}")) for m in quantization.MODES])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_data(tmp_path_factory.mktemp("data"), ["antonym", "sentiment"])


@pytest.fixture
def checkpoint_calls(monkeypatch) -> dict:
    """Counts the decoder layers run under torch.utils.checkpoint (transformers calls it from here)."""
    import transformers.modeling_utils as mu

    calls, real = {"n": 0}, mu.checkpoint

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(mu, "checkpoint", counting)
    return calls


def _train(model_dir, data, root, *extra, tasks=("antonym",)) -> dict[str, dict[str, torch.Tensor]]:
    cfg = cfg_for(model_dir, data, list(tasks), *ONE_TASK, *extra)
    train_library(cfg, root, force=True)
    return {p.parent.name: load_file(p) for p in sorted(root.rglob("adapter_model.safetensors"))
            if ".work" not in p.parts}


# --------------------------------------------------------------------------- config


def test_keys_default_off_and_leave_existing_digests_alone():
    cfg = config.from_dict({})
    assert cfg.training.gradient_checkpointing is False and cfg.base_quantization is None
    assert "base_quantization" not in cfg.to_dict() and "gradient_checkpointing" not in cfg.to_dict()["training"]
    on = config.from_dict({"base_quantization": "4bit", "training": {"gradient_checkpointing": True}})
    assert on.to_dict()["base_quantization"] == "4bit" and on.to_dict()["training"]["gradient_checkpointing"]
    assert on.digest() != cfg.digest()
    mixed = config.from_dict({"mixed": {"training": {"gradient_checkpointing": True, "precision": "bf16"}}})
    assert mixed.training_for("mixed").gradient_checkpointing and mixed.training_for("mixed").precision == "bf16"


@pytest.mark.parametrize("data, key, words", [
    ({"base_quantization": "2bit"}, "base_quantization", "'4bit' or '8bit'"),
    ({"base_quantization": 4}, "base_quantization", ""),
    ({"training": {"gradient_checkpointing": "yes"}}, "training.gradient_checkpointing", ""),
    ({"base_quantization": "4bit", "training": {"method": "cola"}}, "base_quantization", "training.method: cola"),
    ({"base_quantization": "8bit", "mixed": {"training": {"method": "cola"}}}, "base_quantization", "mixed.training"),
    ({"base_quantization": "4bit", "chain": {"branch": "residual"}}, "base_quantization", "chain.branch: residual"),
    ({"base_quantization": "4bit", "sft": {"enabled": True}}, "base_quantization", "sft.enabled"),
])
def test_bad_memory_settings_are_one_line_naming_the_key(data, key, words):
    with pytest.raises(ChainloraError) as e:
        config.from_dict(data, "c.yaml")
    assert str(e.value).startswith(f"c.yaml: {key}: ") and words in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_quantised_cola_with_exit_2(tmp_path, capsys, monkeypatch):
    from chainlora.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("base_quantization: 4bit\ntraining:\n  method: cola\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c.yaml: base_quantization: 4bit base weights cannot change" in err


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_bf16_and_quantization_retrain_checkpointing_keeps(tiny_model_dir, data, tmp_path, capsys):
    root = tmp_path / "lib"
    _train(tiny_model_dir, data, root)

    def plan(*extra: str) -> dict:
        capsys.readouterr()
        train_library(cfg_for(tiny_model_dir, data, ["antonym"], *ONE_TASK, *extra), root, dry_run=True)
        return plan_lines(capsys.readouterr().out)

    assert plan()["antonym"][0] == "keep"
    assert plan("training.gradient_checkpointing=true")["antonym"][0] == "keep"
    assert plan("training.precision=bf16")["antonym"] == ("retrain", "changed: training settings")
    assert plan("base_quantization=4bit")["antonym"] == ("retrain", "changed: base model")
    assert plan("base_quantization=8bit")["antonym"] == ("retrain", "changed: base model")


def test_quantization_modes_and_precision_auto_fingerprints_differ(tiny_model_dir, data, monkeypatch):
    from chainlora.train import changes
    from chainlora.train.plan import load_data, plan_train

    def print_of(*extra: str) -> dict:
        cfg = cfg_for(tiny_model_dir, data, ["antonym"], *ONE_TASK, *extra)
        return changes.fingerprint(plan_train(cfg, load_data(cfg)).jobs[0], cfg, "sha256:x")

    four, eight = print_of("base_quantization=4bit"), print_of("base_quantization=8bit")
    assert len({four["sha256"], eight["sha256"], print_of()["sha256"]}) == 3
    assert four["parts"]["training settings"] == print_of()["parts"]["training settings"]
    auto = cfg_for(tiny_model_dir, data, ["antonym"], *ONE_TASK, "training.precision=auto")
    job = plan_train(auto, load_data(auto)).jobs[0]
    on_cpu = changes.fingerprint(job, auto, "sha256:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    on_gpu = changes.fingerprint(job, auto, "sha256:x")  # auto trains in bf16 there: other weights
    assert on_gpu["parts"]["training settings"] != on_cpu["parts"]["training settings"]


def test_dtype_auto_under_4bit_is_what_it_means_on_this_machine(tiny_model_dir, data, monkeypatch):
    from chainlora.train import changes
    from chainlora.train.plan import load_data, plan_train

    def base_part(*extra: str) -> str:
        cfg = cfg_for(tiny_model_dir, data, ["antonym"], *ONE_TASK, "base_quantization=4bit", *extra)
        return changes.fingerprint(plan_train(cfg, load_data(cfg)).jobs[0], cfg, "sha256:x")["parts"]["base model"]

    on_cpu, float32 = base_part("dtype=auto"), base_part("dtype=float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    # the 4-bit layers multiply in bf16 there: other weights; float32 stays float32 anywhere
    assert base_part("dtype=auto") != on_cpu and base_part("dtype=float32") == float32


# --------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("extra", [(), ("training.method=cola", "training.cola.links=2")], ids=["lora", "cola"])
def test_checkpointing_runs_and_gives_the_same_weights(tiny_model_dir, data, tmp_path, checkpoint_calls, extra):
    plain = _train(tiny_model_dir, data, tmp_path / "plain", *extra)
    assert checkpoint_calls["n"] == 0
    ckpt = _train(tiny_model_dir, data, tmp_path / "ckpt", *extra, "training.gradient_checkpointing=true")
    assert checkpoint_calls["n"] >= 2 * 4  # 2 decoder layers x 4 steps, each recomputed in the backward
    assert plain.keys() == ckpt.keys()
    for name in plain:  # same activations, same dropout masks (RNG replayed): the same adapter
        for key in plain[name]:
            torch.testing.assert_close(plain[name][key], ckpt[name][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("branch", ["warm", "residual"])
def test_checkpointing_with_trunk_and_branches(tiny_model_dir, data, tmp_path, checkpoint_calls, branch):
    extra = (f"chain.branch={branch}", "chain.trunk_steps=4", "mixed.enabled=true")
    tasks = ("antonym", "sentiment")
    plain = _train(tiny_model_dir, data, tmp_path / "plain", *extra, tasks=tasks)
    ckpt = _train(tiny_model_dir, data, tmp_path / "ckpt", *extra, "training.gradient_checkpointing=true", tasks=tasks)
    assert checkpoint_calls["n"] > 0 and set(plain) == set(ckpt) >= {"trunk", "antonym", "sentiment", "mixed"}
    for name in plain:
        for key in plain[name]:
            torch.testing.assert_close(plain[name][key], ckpt[name][key], rtol=0, atol=1e-6)


def test_checkpointing_is_switched_off_after_the_job(tiny_model_dir, data, tmp_path, monkeypatch):
    from chainlora.train import run as train_mod

    seen = {}
    real = train_mod.run_job

    def spy(job, base, *a, **kw):
        entry = real(job, base, *a, **kw)
        seen["model"] = base.model
        return entry

    monkeypatch.setattr(train_mod, "run_job", spy)
    _train(tiny_model_dir, data, tmp_path / "lib", "training.gradient_checkpointing=true")
    model = seen["model"]
    assert not model.is_activation_checkpointing and not getattr(model, "_require_grads_hooks", None)


# --------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_trains_on_cpu_and_saves_float32_adapters(tiny_model_dir, data, tmp_path, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fp32 = _train(tiny_model_dir, data, tmp_path / "fp32")["antonym"]
    bf16 = _train(tiny_model_dir, data, tmp_path / "bf16", "training.precision=bf16", f"dtype={dtype}")["antonym"]
    assert {t.dtype for t in bf16.values()} == {torch.float32}  # LoRA weights stay float32 under autocast
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)  # autocast did run in bf16
    entry = json.loads((tmp_path / "bf16" / "chainlora.json").read_text())["tasks"][0]
    assert entry["loss_curve"] and all(l == l for _, l in entry["loss_curve"])  # finite, no NaN
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(tmp_path / "bf16" / "tasks" / "antonym"))
    with torch.no_grad():
        assert torch.isfinite(plain(torch.tensor([[1, 2, 3]])).logits).all()


# --------------------------------------------------------------------------- QLoRA


def test_refusal_where_bitsandbytes_cannot_run(monkeypatch):
    import sys

    monkeypatch.setattr(quantization, "_checked", {})
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ChainloraError, match=r"^base_quantization: needs bitsandbytes.*chainlora\[qlora\]") as e:
        quantization.check("4bit", "cpu")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(quantization, "_checked", {})
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    pytest.importorskip("bitsandbytes")

    def broken(mode, device):
        raise RuntimeError("no kernel for this device\nsecond line")

    monkeypatch.setattr(quantization, "_probe", broken)
    with pytest.raises(ChainloraError, match=r"^base_quantization: 8bit: bitsandbytes .* cannot run a quantised "
                                             r"layer on cpu here: RuntimeError: no kernel for this device$"):
        quantization.check("8bit", "cpu")


def test_config_and_loaded_base_must_agree(tiny_model_dir):
    from chainlora.base_model import load_base

    base = load_base(str(tiny_model_dir), device="cpu")
    quantization.prepare_for_training(base.model, None)  # unquantised, as configured: nothing to do
    with pytest.raises(ChainloraError, match=r"^c.yaml: base_quantization: the config says 4bit but the base "
                                             r"model was loaded unquantised"):
        quantization.prepare_for_training(base.model, "4bit", "c.yaml: base_quantization")


@needs_bnb
def test_load_base_quantises_on_cpu(tiny_model_dir, mode):
    import bitsandbytes as bnb

    from chainlora.base_model import load_base

    base = load_base(str(tiny_model_dir), device="cpu", quantization=mode)
    q_proj = base.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt)
    assert quantization.mode_of(base.model) == mode
    assert base.fingerprint == load_base(str(tiny_model_dir), device="cpu").fingerprint  # the same weights file


@needs_bnb
def test_qlora_trains_on_cpu_and_the_adapter_loads_on_the_plain_base(tiny_model_dir, data, tmp_path, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path / "lib"
    extra = (f"base_quantization={mode}", "training.max_steps=12", "training.learning_rate=1e-2",
             "training.gradient_checkpointing=true", "training.precision=bf16", "mixed.enabled=true")
    weights = _train(tiny_model_dir, data, root, *extra)
    manifest = json.loads((root / "chainlora.json").read_text())
    assert manifest["training"]["base_quantization"] == mode
    for entry in [*manifest["tasks"], manifest["mixed"]]:
        curve = [loss for _, loss in entry["loss_curve"]]
        assert curve[-1] < curve[0], (entry["name"], curve)  # it learns
    assert {t.dtype for w in weights.values() for t in w.values()} == {torch.float32}
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        before = plain(ids).logits
        model = PeftModel.from_pretrained(plain, str(root / "tasks" / "antonym"))
        after = model(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)  # loaded, and it does something
    train_library(cfg_for(tiny_model_dir, data, ["antonym"], *ONE_TASK, *extra), root)  # unchanged: kept
    assert json.loads((root / "chainlora.json").read_text())["tasks"][0]["sha256"] == manifest["tasks"][0]["sha256"]


@needs_bnb
def test_a_lora_job_leaves_a_quantised_base_as_it_was_loaded(tiny_model_dir, data, tmp_path, mode):
    """PEFT's k-bit preparation upcasts a quantised base's norms and embeddings to float32 for the
    job; after it they are back in the dtype they were loaded in, so a classifier
    over the base embeds the same whether a LoRA job trained before it or every one was kept."""
    from chainlora.base_model import load_base
    from chainlora.inference.classifier import FrozenEncoder
    from chainlora.train import changes
    from chainlora.train.lora_job import run_job
    from chainlora.train.plan import load_data, plan_train
    from chainlora.train.progress import RunProgress

    cfg = cfg_for(tiny_model_dir, data, ["antonym"], *ONE_TASK, f"base_quantization={mode}", "dtype=bfloat16",
                  "training.max_steps=2")
    base = load_base(str(tiny_model_dir), device="cpu", quantization=mode, dtype="bfloat16")
    loaded = {n: p.dtype for n, p in base.model.named_parameters()}
    texts = ["Give the antonym of hot.", "Rhyme with cat."]

    def kernels() -> dict[str, bool]:  # bitsandbytes' CPU inference kernel, where a layer has one
        return {n: m.support_avx512bf16_for_cpu for n, m in base.model.named_modules()
                if hasattr(m, "support_avx512bf16_for_cpu")}

    inference = kernels()

    def embed() -> torch.Tensor:
        return FrozenEncoder("base", base.model, base.tokenizer).embed(texts)

    before = embed()
    restore = quantization.prepare_for_training(base.model, mode)
    upcast = {n for n, p in base.model.named_parameters() if p.dtype != loaded[n]}
    assert upcast and (embed() - before).abs().max() > 1e-4  # the preparation changes the features
    restore()
    job = plan_train(cfg, load_data(cfg)).jobs[0]
    run_job(job, base, cfg, tmp_path / "lib", False, RunProgress([job], enabled=False),
            changes.fingerprint(job, cfg, base.fingerprint))
    assert {n: p.dtype for n, p in base.model.named_parameters()} == loaded and kernels() == inference
    assert torch.allclose(embed(), before, atol=1e-5)


def test_bitsandbytes_hub_kernel_notices_are_dropped(caplog):
    quantization.quiet_hub_kernel_notices()
    quantization.quiet_hub_kernel_notices()  # idempotent
    for name in ("kernels._internals.hf_hub", "bitsandbytes.backends.cpu.ops"):
        log = __import__("logging").getLogger(name)
        assert len(log.filters) == 1
        log.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else", "something else"]


def test_a_trained_4bit_layer_keeps_its_backward_after_an_evaluation():
    """bitsandbytes' CPU backend repacks a 4-bit weight for inference on an eval-mode forward without
    gradients, and the repacked weight has no backward; a model prepared for training never repacks,
    and a weight repacked before is unpacked again (quantization._trainable_layout)."""
    bnb = pytest.importorskip("bitsandbytes")
    if _bnb_runs("4bit"):
        pytest.skip(_bnb_runs("4bit"))
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 128, bias=False)
    x = torch.randn(3, 256)

    def quantised() -> torch.nn.Module:
        layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        return torch.nn.Sequential(layer.to("cpu"))

    def input_grad(model: torch.nn.Module) -> torch.Tensor | None:
        model.train()
        xg = x.clone().requires_grad_(True)
        model(xg).sum().backward()
        return xg.grad

    def evaluate(model: torch.nn.Module) -> bool:
        model.eval()
        with torch.no_grad():
            model(x)  # repacks here on a CPU with AVX512-BF16, unless prepared
        return bool(getattr(model[0].weight.quant_state, "packing_format_for_cpu", False))

    prepared = quantised()
    before = input_grad(prepared)
    quantization._trainable_layout(prepared)
    assert not evaluate(prepared)
    torch.testing.assert_close(input_grad(prepared), before, rtol=0, atol=0)  # exactly as before the evaluation
    repacked = quantised()
    if evaluate(repacked):  # this CPU has the inference kernel: unpacked again (its scales went through bf16)
        quantization._trainable_layout(repacked)
        assert not getattr(repacked[0].weight.quant_state, "packing_format_for_cpu", False)
        after = input_grad(repacked)
        assert after is not None
        torch.testing.assert_close(after, before, rtol=0, atol=0.02 * before.abs().max().item())
