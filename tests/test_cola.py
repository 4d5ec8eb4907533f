"""COLA, the residual chain: knots keep the function, reset the optimizer, step the rank down,
leave the base exact, and export as ONE plain PEFT LoRA with the same logits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from chainlora import library
from chainlora.data.examples import Pair, build_dataset, collator
from chainlora.errors import ChainloraError
from chainlora.library import lora_math
from chainlora.base_model import load_base
from chainlora.train import cola, config
from chainlora.train.config import ColaSettings

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
WORDS = ["hot", "cold", "big", "small", "dog", "cat", "house", "happy", "fast", "slow", "up", "down"]
PAIRS = [Pair(f"Give the antonym of the word {w}.", WORDS[(i + 1) % len(WORDS)]) for i, w in enumerate(WORDS)]


class Probe:
    """A TrainerCallback recording what a test needs at every step end (kept a plain class with
    the hook the Trainer calls, so its position among the callbacks decides before/after)."""

    def __init__(self, fn):
        self.fn, self.seen = fn, {}

    def __getattr__(self, name):  # every other TrainerCallback hook: nothing to do
        if name.startswith("on_"):
            return lambda *a, **kw: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kw):
        self.seen[state.global_step] = self.fn(**kw)


def peft_model(model_dir: Path, r: int = 4, dropout: float = 0.0, dtype: str = "float32", rslora: bool = False):
    from peft import LoraConfig, get_peft_model

    base = load_base(str(model_dir), device="cpu", dtype=dtype)
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                     use_rslora=rslora, task_type="CAUSAL_LM")
    return base, get_peft_model(base.model, cfg)


def batch(tok):
    ds = build_dataset(tok, PAIRS, 48)
    return collator(tok)([ds[i] for i in range(len(ds))])


def loss_of(model, b) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**b).loss.item()
    model.train(was)
    return out


def train(model, tok, tmp: Path, callbacks: list, steps: int = 6, lr: float = 5e-2, scheduler: str = "constant"):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, lr_scheduler_type=scheduler, save_strategy="no",
                             report_to="none", use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True, logging_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=build_dataset(tok, PAIRS, 48),
                      data_collator=collator(tok), callbacks=callbacks)
    trainer.train()
    return trainer


def lora_params(cb: cola.ColaCallback) -> list[torch.nn.Parameter]:
    return [p for layer in cb.layers.values()
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]


# --------------------------------------------------------------------------- the plan


def test_plan_spaces_knots_and_checks_them():
    assert cola.link_plan(ColaSettings(), 9, 8, "k").knots == [3, 6]  # default: 3 links
    assert cola.link_plan(ColaSettings(links=2), 10, 8, "k") == cola.LinkPlan([5], [8, 8])
    assert cola.link_plan(ColaSettings(steps_per_link=4), 10, 8, "k").knots == [4, 8]
    p = cola.link_plan(ColaSettings(knots=[2, 7], rank_schedule=[16, 8, 4]), 10, 8, "k")
    assert p.knots == [2, 7] and p.ranks == [16, 8, 4] and p.links == 3
    with pytest.raises(ChainloraError, match=r"k\.knots: knot at step 10 is not before"):
        cola.link_plan(ColaSettings(knots=[3, 10]), 10, 8, "k")
    with pytest.raises(ChainloraError, match=r"k\.links: 5 links need at least 5 steps"):
        cola.link_plan(ColaSettings(links=5), 4, 8, "k")
    with pytest.raises(ChainloraError, match=r"k\.compress_rank: 30 is above the links' total rank 24"):
        cola.link_plan(ColaSettings(links=3, compress_rank=30), 9, 8, "k")


def test_config_keys_per_adapter_and_errors(tmp_path):
    cfg = config.from_dict({"training": {"method": "cola", "cola": {"links": 3, "restart_warmup_steps": 2}},
                            "mixed": {"training": {"cola": {"links": 2}}},
                            "router": {"training": {"method": "lora"}}})
    mixed, router = cfg.training_for("mixed"), cfg.training_for("router")
    assert mixed.method == "cola" and mixed.cola.links == 2 and mixed.cola.restart_warmup_steps == 2
    assert router.method == "lora"
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("training: {cola: {knots: [4, 2]}}", "bad.yaml: training.cola.knots: expected increasing"),
        ("training: {cola: {links: 2, rank_schedule: [8, 4, 2]}}", "training.cola.rank_schedule: 3 ranks for 2 links"),
        ("mixed: {training: {cola: {link: 2}}}", "mixed.training.cola.link: unknown key (did you mean 'links'?)"),
        ("training: {cola: {init: xavier}}", "training.cola.init: expected 'kaiming' or 'gaussian'"),
    ]:
        bad.write_text(text)
        with pytest.raises(ChainloraError, match=re.escape(message)):
            config.load(bad)


@pytest.mark.slow
def test_bad_knot_fails_before_training(tiny_model_dir, tmp_path, cli):
    r = cli("train", str(TINY), "--out", str(tmp_path / "lib"), "--set", f"base_model={tiny_model_dir}",
            "--set", "mixed.training={method: cola, cola: {knots: [500]}}")
    assert r.returncode == 2 and r.stderr.strip().endswith(
        "mixed.training.cola.knots: knot at step 500 is not before the adapter's last step 12"), r.stderr
    assert not (tmp_path / "lib" / "tasks").exists()


# --------------------------------------------------------------------------- the knot


@pytest.mark.parametrize("reset", [True, False])
def test_knot_keeps_the_loss_and_resets_the_optimizer(tiny_model_dir, tmp_path, reset):
    base, model = peft_model(tiny_model_dir)
    b = batch(base.tokenizer)
    cb = cola.ColaCallback(model, cola.LinkPlan([3], [4, 4]), ColaSettings(reset_optimizer=reset), 8)
    q0 = cb.layers[next(iter(cb.layers))].get_base_layer().weight.detach().clone()
    state = lambda optimizer, **kw: {id(p): bool(getattr(optimizer, "optimizer", optimizer).state.get(p))  # noqa: E731
                                     for p in lora_params(cb)}
    snapshot = lambda **kw: {"loss": loss_of(model, b),  # noqa: E731
                             "B": [layer.lora_B["default"].weight.detach().clone() for layer in cb.layers.values()]}
    before, after, opt_after = Probe(snapshot), Probe(snapshot), Probe(state)
    train(model, base.tokenizer, tmp_path, [before, cb, after, opt_after])
    assert abs(before.seen[3]["loss"] - after.seen[3]["loss"]) <= 1e-5
    assert any(bool(x.abs().max() > 0) for x in before.seen[3]["B"])  # the link had learned something
    assert all(bool(x.abs().max() == 0) for x in after.seen[3]["B"])  # ... and the new link starts at zero
    assert abs(before.seen[2]["loss"] - before.seen[3]["loss"]) > 1e-4  # training does move the loss
    assert all(opt_after.seen[2].values())  # AdamW holds state for every LoRA parameter
    assert not any(opt_after.seen[3].values()) if reset else all(opt_after.seen[3].values())
    assert all(opt_after.seen[4].values())  # the next step starts a new state
    merged = cb.layers[next(iter(cb.layers))].get_base_layer().weight
    assert not torch.equal(merged, q0)  # link 1 lives in the weights now
    assert len(cb.links) == 1


def test_rank_step_down_rebuilds_layers_and_optimizer(tiny_model_dir, tmp_path):
    base, model = peft_model(tiny_model_dir)
    cb = cola.ColaCallback(model, cola.LinkPlan([2, 4], [4, 2, 1]), ColaSettings(), 8)

    def look(optimizer, **kw):
        inner = getattr(optimizer, "optimizer", optimizer)
        in_groups = {id(p) for g in inner.param_groups for p in g["params"]}
        layer = next(iter(cb.layers.values()))
        return {"rank": layer.lora_A["default"].weight.shape[0], "scaling": layer.scaling["default"],
                "tracked": all(id(p) in in_groups for p in lora_params(cb))}

    probe = Probe(look)
    train(model, base.tokenizer, tmp_path, [cb, probe])
    assert [probe.seen[s]["rank"] for s in range(1, 7)] == [4, 2, 2, 1, 1, 1]
    assert probe.seen[3]["scaling"] == 8 / 2 and probe.seen[5]["scaling"] == 8 / 1
    assert all(v["tracked"] for v in probe.seen.values())  # the optimizer follows the new modules
    assert any(bool(layer.lora_B["default"].weight.abs().max() > 0) for layer in cb.layers.values())
    assert [link[next(iter(link))][0].shape[0] for link in cb.links] == [4, 2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rebuilt_layers_are_peft_layers_summing_the_links(tiny_model_dir, dtype):
    """The knot and the export rebuild A and B through PEFT's layer API: the result must be what
    PEFT gives a fresh adapter (r, alpha, scaling, trainable, active, where and in the dtype
    get_peft_model put it, the same dropout), and each layer must compute W0 + sum_j s_j B_j A_j."""
    import torch.nn.functional as F

    base, model = peft_model(tiny_model_dir, dropout=0.1, dtype=dtype)
    cb = cola.ColaCallback(model, cola.LinkPlan([1], [4, 2]), ColaSettings(), 8)
    layers = cb.layers.values()
    w0 = {n: layer.get_base_layer().weight.detach().clone() for n, layer in cb.layers.items()}
    dropouts = {n: layer.lora_dropout["default"] for n, layer in cb.layers.items()}
    torch.manual_seed(1)
    with torch.no_grad():  # link 1 has learned something
        for layer in layers:
            layer.lora_B["default"].weight.normal_(std=0.1)
    ab1 = {n: (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
           for n, layer in cb.layers.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    old = {id(p) for p in lora_params(cb)}
    cb.tie(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(any(p is q for q in params) for p in lora_params(cb)) and not old & {id(p) for p in params}
    x = torch.randn(3, 32)
    for n, layer in cb.layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert layer.r["default"] == 2 and layer.lora_alpha["default"] == 8 and layer.scaling["default"] == 4.0
        assert a.shape == (2, 32) and b.shape == (layer.out_features, 2)
        assert a.dtype == b.dtype == torch.float32 and a.device == layer.get_base_layer().weight.device
        assert a.requires_grad and b.requires_grad and layer.active_adapters == ["default"]
        assert layer.lora_dropout["default"] is dropouts[n] and dropouts[n].p == 0.1
        assert bool(a.abs().max() > 0) and bool(b.abs().max() == 0)
        merged = torch.addmm(w0[n].float(), ab1[n][1], ab1[n][0], alpha=2.0).to(w0[n].dtype)
        assert torch.equal(layer.get_base_layer().weight, merged)  # W0 + s_1 B_1 A_1, exactly
        with torch.no_grad():
            b.normal_(std=0.1)  # link 2 learns too
            layer.eval()
            want = F.linear(x.to(merged.dtype), merged).float() + (x @ a.T @ b.T) * 4.0
            assert torch.allclose(layer(x.to(merged.dtype)).float(), want, atol=1e-5 if dtype == "float32" else 3e-2)
    ids = base.tokenizer("Give the antonym of the word hot.", return_tensors="pt")["input_ids"]
    before = logits(model, ids)
    cb.export()
    for n, layer in cb.layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert layer.r["default"] == layer.lora_alpha["default"] == 6 and layer.scaling["default"] == 1.0
        assert a.shape == (6, 32) and b.shape == (layer.out_features, 6) and a.dtype == b.dtype == torch.float32
        assert a.requires_grad and b.requires_grad and layer.lora_dropout["default"] is dropouts[n]
        assert torch.equal(layer.get_base_layer().weight, w0[n])  # the base is W0 again
    assert model.peft_config["default"].r == model.peft_config["default"].lora_alpha == 6
    assert (logits(model, ids) - before).abs().max() <= (1e-5 if dtype == "float32" else 5e-2)


def test_restart_warmup_makes_a_jagged_schedule(tiny_model_dir, tmp_path):
    lrs = {}
    for warm in (0, 2):
        base, model = peft_model(tiny_model_dir)
        cb = cola.ColaCallback(model, cola.LinkPlan([3], [4, 4]), ColaSettings(restart_warmup_steps=warm), 8)
        probe = Probe(lambda lr_scheduler, **kw: lr_scheduler.get_last_lr()[0])
        train(model, base.tokenizer, tmp_path / str(warm), [cb, probe], lr=1e-2, scheduler="linear")
        lrs[warm] = probe.seen
    plain, jagged = lrs[0], lrs[2]
    assert jagged[1] == pytest.approx(plain[1]) and jagged[2] == pytest.approx(plain[2])
    # two reduced steps after the knot at 3 (1/3, 2/3 of the schedule), then the schedule again
    assert jagged[3] == pytest.approx(plain[3] / 3) and jagged[4] == pytest.approx(plain[4] * 2 / 3)
    assert jagged[5] == pytest.approx(plain[5])


# --------------------------------------------------------------------------- base and export


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_export_is_one_plain_lora_with_the_links_logits(tiny_model_dir, tmp_path, rslora):
    """Links of ranks 4, 2, 2 (each scaled by PEFT's s: alpha / r, or alpha / sqrt(r) with
    rsLoRA) export to ONE plain rank-8 LoRA with scaling 1 that gives the trained logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, model = peft_model(tiny_model_dir, rslora=rslora)
    ids = base.tokenizer("Give the antonym of the word hot.", return_tensors="pt")["input_ids"]
    with model.disable_adapter():
        w0_logits = logits(model, ids)
    cb = cola.ColaCallback(model, cola.LinkPlan([2, 4], [4, 2, 2]), ColaSettings(), 8)
    train(model, base.tokenizer, tmp_path, [cb])
    trained = logits(model, ids)
    root = (lambda r: r ** 0.5) if rslora else (lambda r: r)
    assert cb.scalings == [8 / root(4), 8 / root(2)] and cb._scaling() == 8 / root(2)
    info = cb.export()
    assert info == {"links": 3, "knots": [2, 4], "ranks": [4, 2, 2], "export_rank": 8}
    assert (trained - logits(model, ids)).abs().max() <= 1e-5
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), w0_logits)  # W0 restored exactly, by copy
    model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 8 and saved["use_rslora"] is False
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "adapter"))
    assert (trained - logits(plain, ids)).abs().max() <= 1e-5
    assert (trained - w0_logits).abs().max() > 1e-3  # the links did change the model


def test_truncated_svd_error_falls_with_rank():
    torch.manual_seed(0)
    b, a = torch.randn(24, 6), torch.randn(6, 40)
    delta = b @ a
    errors = []
    for r in range(1, 7):
        nb, na, tail, full = lora_math.truncate(b, a, r)
        assert nb.shape == (24, r) and na.shape == (r, 40)
        direct = (torch.linalg.norm(delta - nb @ na) / torch.linalg.norm(delta)).item()
        assert abs(direct - (tail / full) ** 0.5) < 1e-5  # the reported error is the real one
        errors.append(direct)
    assert all(x > y for x, y in zip(errors, errors[1:])) and errors[-1] < 1e-5
    nb, na, tail, _ = lora_math.truncate(b[:4], a, 6)  # a 4-wide layer has 4 singular values, r = 6
    assert nb.shape == (4, 6) and na.shape == (6, 40) and tail == 0.0
    assert torch.allclose(nb @ na, b[:4] @ a, atol=1e-4)
    s = torch.linalg.svdvals(delta)  # Eckart-Young: the best rank-2 error
    assert errors[1] == pytest.approx((s[2:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-4)


def tiny_cola(model_dir: Path, *extra: str) -> config.Config:
    return config.load(TINY, overrides=[f"base_model={model_dir}", "tasks=[antonym, sentiment]",
                                        "router.enabled=false", "classifier.enabled=false",
                                        "training.method=cola", "training.max_steps=6", "training.cola.links=3",
                                        "training.save_steps=2", *extra])


def test_cola_library_leaves_the_base_exact_and_loads_in_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chainlora.train import run as train_mod
    from chainlora.train.progress import RunProgress

    cfg = tiny_cola(tiny_model_dir, "mixed.training={method: lora}", "training.cola.compress_rank=6")
    base = load_base(str(tiny_model_dir), device="cpu")
    ids = base.tokenizer("Is the word happy positive or negative?", return_tensors="pt")["input_ids"]
    before = logits(base.model, ids)
    jobs = train_mod.plan_train(cfg, train_mod.load_data(cfg)).jobs
    assert [j.link_plan is not None for j in jobs] == [True, True, False]  # mixed overrides back to lora
    root = tmp_path / "lib"
    progress = RunProgress(jobs, enabled=False)
    from chainlora.train.changes import fingerprint

    entry = train_mod.run_job(jobs[0], base, cfg, root, False, progress,
                              fingerprint(jobs[0], cfg, base.fingerprint))
    assert torch.equal(logits(base.model, ids), before)  # the next adapter starts from W0
    c = entry["cola"]
    assert c["ranks"] == [4, 4, 4] and c["knots"] == [2, 4] and c["export_rank"] == 6
    assert c["compress"]["total_rank"] == 12 and 0 <= c["compress"]["relative_error"] < 1
    assert len(c["compress"]["module_errors"]) == 4  # 2 layers x q_proj, v_proj
    assert len(entry["loss_curve"]) == 3 and entry["test_loss"] > 0
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(root / "tasks/antonym"))
    assert json.loads((root / "tasks/antonym/adapter_config.json").read_text())["r"] == 6
    assert not torch.equal(logits(plain, ids), before)


def test_failed_cola_job_restores_the_base_and_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    """A crash after a knot (checkpoint at step 4 holds 2 tied links) restores W0 in-process;
    --resume rebuilds the links and ends bit-for-bit (1e-5) where an uninterrupted run ends."""
    from safetensors.torch import load_file

    from chainlora.train import train_library

    cfg = tiny_cola(tiny_model_dir, "training.cola.rank_schedule=[4, 2, 2]", "mixed.enabled=false")
    clean = train_library(cfg, tmp_path / "clean")

    original = cola.ColaCallback.on_step_end

    def crash(self, args, state, control, **kw):
        original(self, args, state, control, **kw)
        if state.global_step == 5 and self.layers and "sentiment" in args.output_dir:
            raise KeyboardInterrupt

    monkeypatch.setattr(cola.ColaCallback, "on_step_end", crash)
    with pytest.raises(KeyboardInterrupt):
        train_library(cfg, tmp_path / "resumed")
    assert (tmp_path / ".resumed.partial/.work/tasks-sentiment/checkpoint-4/cola.safetensors").is_file()
    monkeypatch.setattr(cola.ColaCallback, "on_step_end", original)
    resumed = train_library(cfg, tmp_path / "resumed", resume=True)
    for task in ("antonym", "sentiment"):
        a = load_file(clean / f"tasks/{task}/adapter_model.safetensors")
        b = load_file(resumed / f"tasks/{task}/adapter_model.safetensors")
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-5 for k in a)
    entries = {t["name"]: t for t in library.read_manifest(resumed)["tasks"]}
    assert entries["sentiment"]["cola"]["ranks"] == [4, 2, 2]
