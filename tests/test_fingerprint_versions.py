"""Fingerprint versions: a library an older chainlora wrote is compared by its own version's rule
and upgraded without retraining; version 2 holds the model's config.json and leaves out the
settings that cannot change an adapter's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TASKS, cfg_for, files, plan_lines, write_data

from chainlora.library import Library, kinds, store
from chainlora.train import changes, train_library
from chainlora.train.plan import load_data, plan_train


@pytest.fixture(scope="module")
def v2_lib(tiny_model_dir, tmp_path_factory) -> tuple[Path, tuple[Path, Path]]:
    data = write_data(tmp_path_factory.mktemp("data"), TASKS)
    lib = tmp_path_factory.mktemp("lib") / "lib"
    return train_library(cfg_for(tiny_model_dir, data, TASKS), lib), data


def _as_version_1(lib: Path, cfg) -> None:
    """Rewrite a library's manifest as version 1 wrote it: every entry's fingerprint, and the
    `selection` block measured for those fingerprints, by version 1's rule."""
    from chainlora.train import recipe, selection

    plan = plan_train(cfg, load_data(cfg))
    _, _, fingerprints = recipe._fingerprints(cfg, 1)
    old = fingerprints(plan.jobs, 1)
    manifest = store.read_manifest(lib)
    for _, entry in changes.entries(manifest):
        entry["fingerprint"] = old[entry["path"]]
    selectors = {j.kind: old[j.path]["sha256"] for j in plan.jobs if kinds.ENTRIES[j.kind].selector}
    manifest["selection"]["fingerprint"] = selection.fingerprint(cfg, plan.split, selectors)
    store.write_manifest(lib, manifest)


def test_a_library_version_1_wrote_keeps_every_adapter_and_is_upgraded(v2_lib, tiny_model_dir, tmp_path, capsys):
    base_lib, data = v2_lib
    lib = tmp_path / "lib"
    shutil.copytree(base_lib, lib)
    cfg = cfg_for(tiny_model_dir, data, TASKS)
    _as_version_1(lib, cfg)
    before = files(lib)
    assert {e["fingerprint"]["version"] for _, e in changes.entries(store.read_manifest(lib))} == {1}

    selection = store.read_manifest(lib)["selection"]
    train_library(cfg, lib)
    out = capsys.readouterr().out
    plan = plan_lines(out)
    assert len(plan) == 6 and all(a == "keep" for a, _ in plan.values()), plan
    assert files(lib) == before  # nothing retrained
    assert "measuring the selectors" not in out  # nor measured: the block is carried over
    manifest = Library.open(lib).manifest
    assert {e["fingerprint"]["version"] for _, e in changes.entries(manifest)} == {changes.FINGERPRINT_VERSION}
    assert manifest["selection"] == {**selection, "fingerprint": store.read_manifest(base_lib)["selection"]["fingerprint"]}

    train_library(cfg, lib)  # upgraded: nothing left to do
    assert "already trained with this config" in capsys.readouterr().out


def test_a_change_version_1_sees_retrains_what_it_wrote(v2_lib, tiny_model_dir, tmp_path, capsys):
    base_lib, data = v2_lib
    lib = tmp_path / "lib"
    shutil.copytree(base_lib, lib)
    _as_version_1(lib, cfg_for(tiny_model_dir, data, TASKS))
    train_library(cfg_for(tiny_model_dir, data, TASKS, "training.learning_rate=5.0e-3"), lib, dry_run=True)
    plan = plan_lines(capsys.readouterr().out)
    assert plan["antonym"] == ("retrain", "changed: training settings")  # named by version 1's parts
    assert plan["(classifier)"][0] == "keep"


def test_the_model_config_json_is_part_of_the_base_model(v2_lib, tiny_model_dir, tmp_path, capsys):
    """Editing rope or norm settings in a local model's config.json retrains what runs on the
    base; a config saved by another transformers version (only its version key differs) does not."""
    base_lib, data = v2_lib
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)

    def plan() -> dict:
        capsys.readouterr()
        train_library(cfg_for(model, data, TASKS), base_lib, dry_run=True)
        return plan_lines(capsys.readouterr().out)

    assert all(a == "keep" for a, _ in plan().values())  # the same files elsewhere: the same base
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}))
    assert all(a == "keep" for a, _ in plan().values())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    edited = plan()
    assert edited["antonym"] == ("retrain", "changed: base model")
    assert {a for a, _ in edited.values()} == {"retrain"}  # the tiny config's classifier embeds with the base


def _job(kind: str, *extra: str, tmp_path: Path, model: Path):
    cfg = cfg_for(model, write_data(tmp_path, TASKS), TASKS, "encoder.enabled=true", *extra)
    return next(j for j in plan_train(cfg, load_data(cfg)).jobs if j.kind == kind), cfg


EARLY = "training.early_stopping.enabled=true"


@pytest.mark.parametrize("kind, both, extra", [
    ("task", (), "training.cola.links=3"),  # read only under method: cola
    ("task", (), "training.epochs=5"),  # max_steps is set: the step count is the same
    ("router", (EARLY,), "training.early_stopping.patience=9"),  # the router has no validation records
])
def test_version_2_leaves_out_what_cannot_change_the_weights(kind, both, extra, tiny_model_dir, tmp_path):
    plain, cfg = _job(kind, *both, tmp_path=tmp_path, model=tiny_model_dir)
    other, cfg2 = _job(kind, *both, extra, tmp_path=tmp_path, model=tiny_model_dir)
    for version, same in ((1, False), (2, True)):
        a, b = (changes.fingerprint(j, c, "sha256:x", version=version)["sha256"] for j, c in ((plain, cfg), (other, cfg2)))
        assert (a == b) is same, (kind, extra, version)


def test_version_2_keeps_what_does_change_them(tiny_model_dir, tmp_path):
    def print_of(kind: str, *extra: str, base: str = "sha256:x", version: int = changes.FINGERPRINT_VERSION) -> str:
        job, cfg = _job(kind, *extra, tmp_path=tmp_path, model=tiny_model_dir)
        return changes.fingerprint(job, cfg, base, version=version)["sha256"]

    same = print_of("task")
    assert print_of("task", "training.max_steps=5") != same  # the step count
    early = print_of("task", EARLY)
    assert print_of("task", EARLY, "training.early_stopping.patience=9") != early  # a task stops on validation
    # the batching of the validation loss can move the chosen checkpoint: in where a job stops on it
    assert print_of("task", EARLY, "training.eval_batch_size=3") != early
    assert print_of("task", EARLY, "training.eval_batch_size=3", version=1) == print_of("task", EARLY, version=1)
    assert print_of("task", "training.eval_batch_size=3") == same
    assert print_of("router", EARLY, "training.eval_batch_size=3") == print_of("router", EARLY)
    # a residual branch compresses trunk ⊕ branch to cola.compress_rank under method: lora too
    residual = print_of("task", "chain.branch=residual")
    assert print_of("task", "chain.branch=residual", "training.cola.compress_rank=4") != residual
    assert print_of("task", "chain.branch=residual", "training.cola.links=3") == residual
    # the MiniLM encoder never reads the base model; a classifier over the base does
    assert print_of("encoder", base="sha256:a") == print_of("encoder", base="sha256:b")
    assert print_of("classifier", base="sha256:a") != print_of("classifier", base="sha256:b")
    assert print_of("classifier", "classifier.encoder=minilm", base="sha256:a") == \
        print_of("classifier", "classifier.encoder=minilm", base="sha256:b")


def test_resume_continues_checkpoints_an_older_version_labelled(tiny_model_dir, tmp_path):
    """An interrupted adapter's checkpoints carry its fingerprint: --resume after an upgrade goes
    on from them when the older version's fingerprint is this very job's, and only then."""
    from chainlora.train import recipe
    from chainlora.train.lora_job import FINGERPRINT_FILE, work_dir

    cfg = cfg_for(tiny_model_dir, write_data(tmp_path, TASKS), TASKS)
    jobs = plan_train(cfg, load_data(cfg)).jobs
    _, _, fingerprints = recipe._fingerprints(cfg, 1)
    by_version = recipe._by_version(fingerprints, jobs)
    job, current = jobs[0], by_version(changes.FINGERPRINT_VERSION)[jobs[0].path]
    todo = [changes.Change("train", job.kind, job.name, job.path, "new", job, fingerprint=current)]
    label = work_dir(tmp_path / "partial", job) / FINGERPRINT_FILE
    label.parent.mkdir(parents=True)
    for found, after in ((by_version(1)[jobs[1].path]["sha256"], None),  # another job's: left alone
                         (by_version(1)[job.path]["sha256"], current["sha256"])):
        label.write_text(found + "\n")
        recipe._relabel(todo, tmp_path / "partial", by_version)
        assert label.read_text().strip() == (after or found)
