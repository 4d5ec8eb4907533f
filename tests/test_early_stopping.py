"""`training.early_stopping`: each answer adapter saved at its best validation loss, the mixed
adapter chosen on the same validation records as the task adapters, fingerprints that know it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chainlora.errors import ChainloraError
from chainlora.library import Library
from chainlora.train import config, train_library
from chainlora.train.changes import fingerprint
from chainlora.train.plan import load_data, plan_train, validation_records

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
EARLY = ["training.early_stopping.enabled=true", "training.early_stopping.validation_per_task=4",
         "training.early_stopping.eval_steps=2"]


def tiny_config(model_dir: Path, *extra: str) -> config.Config:
    return config.load(TINY, overrides=[f"base_model={model_dir}", "classifier.enabled=false", *extra])


def test_validation_records_are_held_out_of_every_job_and_the_mixed_adapter_gets_them_all(tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, *EARLY, "chain.branch=warm")
    data = load_data(cfg)
    held = validation_records(cfg, data)
    assert all(len(v) == 4 for v in held.values())
    held_text = {r.text for v in held.values() for r in v}
    jobs = {j.name: j for j in plan_train(cfg, data).jobs}
    for job in jobs.values():  # no adapter and no selector trains on them
        assert not held_text & {p.text for p in job.train}, job.name
    for t in held:
        assert {p.text for p in jobs[t].validation} == {r.text for r in held[t]}
    everything = sorted(p.text for t in held for p in jobs[t].validation)
    assert sorted(p.text for p in jobs["mixed"].validation) == everything  # the same data, all of it
    assert sorted(p.text for p in jobs["trunk"].validation) == everything
    assert jobs["router"].validation == []  # the selectors are chosen by `selection`, not by this


def test_fingerprints_include_the_option_and_leave_libraries_without_it_alone(tiny_model_dir):
    def prints(*extra: str) -> dict[str, str]:
        cfg = tiny_config(tiny_model_dir, *extra)
        return {j.path: fingerprint(j, cfg, "sha256:x")["sha256"] for j in plan_train(cfg, load_data(cfg)).jobs}

    off, default = prints("training.early_stopping.enabled=false"), prints()
    assert off == default  # the key's defaults change nothing an existing library was trained with
    on = prints(*EARLY)
    assert all(on[p] != off[p] for p in on if p != "router")  # other examples AND a stopping rule
    patience = prints(*EARLY, "training.early_stopping.patience=2")
    assert patience["tasks/antonym"] != on["tasks/antonym"]
    more = prints(*EARLY[:1], "training.early_stopping.validation_per_task=3", EARLY[2])
    assert more["mixed"] != on["mixed"]


def test_cola_and_early_stopping_are_refused_together(tiny_model_dir):
    with pytest.raises(ChainloraError, match=r"training.early_stopping: not with method: cola"):
        tiny_config(tiny_model_dir, *EARLY, "training.method=cola")


def test_the_saved_adapter_is_the_best_checkpoint(tiny_model_dir, tmp_path):
    """A learning rate that overshoots: the validation loss has a minimum before the last step,
    and the adapter in the library is the checkpoint at that minimum, not the last weights."""
    from chainlora.data.examples import Pair, build_dataset, collator
    from chainlora.inference.engine import Engine

    cfg = tiny_config(tiny_model_dir, *EARLY, "tasks=[antonym]", "router.enabled=false", "mixed.enabled=false",
                      "training.max_steps=12", "training.learning_rate=1.0", "training.lr_scheduler=constant",
                      "lora.dropout=0")
    root = train_library(cfg, tmp_path / "lib")
    entry = Library.open(root).tasks[0]
    stop = entry["early_stopping"]
    curve = dict(stop["validation_curve"])
    assert sorted(curve) == list(range(2, 13, 2)) and stop["planned_steps"] == 12
    assert stop["best_step"] == min(curve, key=curve.get) < 12, curve  # not simply the last weights
    assert stop["best_validation_loss"] == pytest.approx(min(curve.values()), abs=1e-4)
    # the library's adapter scores exactly the best validation loss on the validation records
    engine = Engine.load(root, device="cpu")
    held = [(r.text, r.output) for r in validation_records(cfg, load_data(cfg))["antonym"]]
    ds = build_dataset(engine.tok, [Pair(t, a) for t, a in held], cfg.training.max_length, cfg.system_prompt)
    batch = collator(engine.tok)([ds[i] for i in range(len(ds))])
    model = engine.cache.acquire(["antonym"])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    adapter_names=[engine.cache.slot("antonym")] * len(ds))
    assert out.loss.item() == pytest.approx(stop["best_validation_loss"], abs=2e-3)


def test_patience_stops_early(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, *EARLY, "training.early_stopping.patience=1", "tasks=[antonym]",
                      "router.enabled=false", "mixed.enabled=false", "training.max_steps=40",
                      "training.learning_rate=0.2", "training.lr_scheduler=constant")
    entry = Library.open(train_library(cfg, tmp_path / "lib")).tasks[0]
    stop = entry["early_stopping"]
    assert entry["steps"] < 40 and entry["steps"] == stop["validation_curve"][-1][0]
    assert stop["best_step"] <= entry["steps"] - 2


def test_finetune_holds_out_the_same_validation_records(tiny_model_dir):
    """The one big adapter of `chainlora finetune` (the capacity bench's mixed adapter at rank 10 r)
    is chosen on exactly the records the chain's adapters are chosen on."""
    from chainlora.train.plan import plan_finetune

    cfg = tiny_config(tiny_model_dir, *EARLY)
    data = load_data(cfg)
    (job,) = plan_finetune(cfg, data).jobs
    held = validation_records(cfg, data)
    assert sorted(p.text for p in job.validation) == sorted(r.text for v in held.values() for r in v)
    assert not {p.text for p in job.validation} & {p.text for p in job.train}
    plain = plan_finetune(tiny_config(tiny_model_dir), data).jobs[0]
    assert plain.validation == [] and len(plain.train) == len(job.train) + len(job.validation)


def test_the_last_step_is_a_candidate_when_steps_are_not_a_multiple_of_eval_steps(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, *EARLY[:2], "training.early_stopping.eval_steps=4", "tasks=[antonym]",
                      "router.enabled=false", "mixed.enabled=false", "training.max_steps=6")
    stop = Library.open(train_library(cfg, tmp_path / "lib")).tasks[0]["early_stopping"]
    assert [s for s, _ in stop["validation_curve"]] == [4, 6]
    short = tiny_config(tiny_model_dir, *EARLY[:2], "training.early_stopping.eval_steps=10", "tasks=[antonym]",
                        "router.enabled=false", "mixed.enabled=false", "training.max_steps=3")
    stop = Library.open(train_library(short, tmp_path / "short")).tasks[0]["early_stopping"]
    assert [s for s, _ in stop["validation_curve"]] == [3] and stop["best_validation_loss"] is not None
